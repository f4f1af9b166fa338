"""FID against torch-fidelity itself, the resize protocol, the feature cache, and the one-line
errors when the Inception weights are missing. Nothing is downloaded: the Inception weights file is
a random-initialised torch-fidelity extractor saved to a temp dir (features of no meaning, but the
same network, so both implementations must agree on them)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.eval import fid as fid_mod
from cm3leon.eval.fid import ImageSet, MissingWeightsError, ResizeProtocol, compute_fid, resolve_inception_weights
from project import PROJECT_ROOT

torch.set_num_threads(2)


def random_inception_weights(path) -> None:
    """Save the state dict of a random-initialised torch-fidelity InceptionV3 (no download).

    Convolutions get He-normal init so that activations keep their scale through ~90 layers (with
    PyTorch's default init the pool3 features shrink to ~1e-8 and every distance is ~0)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init
            return None

    empty = path.parent / "empty_state.pt"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def write_pngs(folder, n: int, seed: int, size=(32, 32)) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    arr = np.clip(base + rng.normal(0, 60, size=(n, size[1], size[0], 3)), 0, 255).astype(np.uint8)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return arr


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """(weights file, generated folder, reference folder, cache dir, our result at the 64-d layer).

    Two PNGs per set. The default-suite parity test uses torch-fidelity's 64-d diagnostic layer (the
    network's stem: an early exit) because on a loaded 2-core CPU each image costs ~2 s at pool3
    and torch-fidelity's general eigensolver ~30 s at 2048 dims; the pool3 parity test is `slow`."""
    root = tmp_path_factory.mktemp("fid")
    weights = root / "inception_random.pth"
    random_inception_weights(weights)
    gen, ref = root / "gen", root / "ref"
    write_pngs(gen, 2, seed=1)
    write_pngs(ref, 2, seed=2)
    cache = root / "cache"
    ours = compute_fid(
        gen,
        ref,
        weights_path=weights,
        resize=ResizeProtocol("none", None),
        cache_dir=cache,
        kid=True,
        kid_subset_size=2,
        kid_subsets=10,
        device="cpu",
        batch_size=8,
        feature_layer="64",
    )
    return weights, gen, ref, cache, ours


def torch_fidelity_metrics(weights, gen, ref, layer: str) -> dict:
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(gen),
        input2=str(ref),
        fid=True,
        kid=True,
        kid_subset_size=2,
        kid_subsets=10,
        cuda=False,
        feature_extractor_weights_path=str(weights),
        feature_layer_fid=layer,
        feature_layer_kid=layer,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        batch_size=8,
    )


def assert_same_as_torch_fidelity(ours: dict, theirs: dict) -> None:
    fid = theirs["frechet_inception_distance"]
    assert ours["fid"] > 0 and np.isfinite(ours["fid"])
    assert abs(ours["fid"] - fid) <= 1e-3 * abs(fid), (ours["fid"], fid)
    kid = theirs["kernel_inception_distance_mean"]
    assert abs(ours["kid_mean"] - kid) <= 1e-3 * abs(kid) + 1e-9, (ours["kid_mean"], kid)


def test_fid_equals_torch_fidelity_calculate_metrics(inception):
    import torch_fidelity

    weights, gen, ref, _, ours = inception
    assert_same_as_torch_fidelity(ours, torch_fidelity_metrics(weights, gen, ref, "64"))
    assert ours["n_generated"] == 2 and ours["n_reference"] == 2
    assert ours["evaluator"] == "torch-fidelity" and ours["evaluator_version"] == torch_fidelity.__version__
    assert ours["feature_extractor_weights_sha256"] == fid_mod.file_sha256(weights)
    assert ours["feature_extractor_layer"].startswith("64")
    assert not ours["reference_cached"] and not ours["generated_cached"]


@pytest.mark.slow
def test_fid_equals_torch_fidelity_at_pool3(inception, tmp_path):
    """FID's own definition (2048-d pool3 features), no cache."""
    weights, gen, ref, _, _ = inception
    ours = compute_fid(
        gen,
        ref,
        weights_path=weights,
        resize=ResizeProtocol("none", None),
        kid=True,
        kid_subset_size=2,
        kid_subsets=10,
        device="cpu",
        batch_size=8,
    )
    assert ours["feature_extractor_layer"] == "2048 (pool3)"
    assert_same_as_torch_fidelity(ours, torch_fidelity_metrics(weights, gen, ref, "2048"))


def test_second_run_reuses_cached_features(inception, monkeypatch):
    weights, gen, ref, cache, ours = inception
    assert len(list(cache.glob("features_*.npz"))) == 2  # one per image set

    def no_extraction(self, images):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(fid_mod.InceptionSpace, "features", no_extraction)
    again = compute_fid(
        gen,
        ref,
        weights_path=weights,
        resize=ResizeProtocol("none", None),
        cache_dir=cache,
        kid=True,
        kid_subset_size=2,
        kid_subsets=10,
        device="cpu",
        feature_layer="64",
    )
    assert again["reference_cached"] and again["generated_cached"]
    assert again["fid"] == pytest.approx(ours["fid"], rel=1e-12)
    assert again["reference_hash"] == ours["reference_hash"]
    # the cache key follows the content, the feature space and the resize protocol
    space = {"name": "x", "weights_sha256": "0"}
    key = fid_mod.FeatureCache.key
    assert key("h", space, ResizeProtocol("none", None)) != key("h", space, ResizeProtocol("bicubic", 16))
    assert key("h", space, ResizeProtocol("none", None)) != key("h2", space, ResizeProtocol("none", None))
    assert key("h", space, ResizeProtocol("none", None)) != key(
        "h", {**space, "weights_sha256": "1"}, ResizeProtocol("none", None)
    )


def test_content_hash_follows_pixels_not_paths(tmp_path):
    a = write_pngs(tmp_path / "a", 2, seed=3)
    write_pngs(tmp_path / "b", 2, seed=3)
    assert ImageSet(tmp_path / "a").content_hash() == ImageSet(tmp_path / "b").content_hash()
    assert ImageSet(a).content_hash() == ImageSet(torch.from_numpy(a).permute(0, 3, 1, 2)).content_hash()
    b = a.copy()
    b[0, 0, 0, 0] ^= 1
    assert ImageSet(a).content_hash() != ImageSet(b).content_hash()


def test_resize_protocol_short_side_and_centre_crop():
    img = Image.fromarray(np.zeros((40, 80, 3), np.uint8))  # 80 wide, 40 high
    out = ResizeProtocol("lanczos", 20)(img)
    assert out.size == (20, 20)
    assert ResizeProtocol("none", None)(img) is img
    with pytest.raises(ValueError, match="resize.method"):
        ResizeProtocol("nearest", 20)
    # uint8 in, uint8 out, [3, H, W]
    x = ImageSet([np.full((40, 80, 3), 7, np.uint8)], ResizeProtocol("bicubic", 16))[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and int(x.float().mean()) == 7


def test_generated_jpeg_refused_and_mixed_sizes_named(tmp_path):
    (tmp_path / "g").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "g" / "0.jpg")
    with pytest.raises(ValueError, match="PNG"):
        ImageSet(tmp_path / "g", lossless_only=True)
    with pytest.raises(ValueError, match="different sizes"):
        fid_mod.collate_same_size([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 9, 9, dtype=torch.uint8)])


def test_missing_weights_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as e:
        resolve_inception_weights(tmp_path / "nope.pth")
    assert "fid.inception_weights=PATH" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MissingWeightsError, match="fid.download=false"):
        resolve_inception_weights(None, download=False)

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MissingWeightsError) as e:
        resolve_inception_weights(None, download=True)
    msg = str(e.value)
    assert "download failed" in msg and fid_mod.inception_url() in msg and "\n" not in msg
    assert not list((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial file left behind


def test_eval_fid_script_without_weights_says_what_is_missing(tmp_path):
    """`make eval-fid` runs this: no Inception weights (empty torch home), no download -> one line, exit 1."""
    env = {"TORCH_HOME": str(tmp_path / "torch_home"), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    args = ["fid.download=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "eval_fid.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # a usage error (cm3leon.cli)
    lines = [s for s in proc.stderr.strip().splitlines() if s.strip()]
    assert len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("error: Inception weights for FID are missing") and "fid.inception_weights=PATH" in lines[0]
    )
