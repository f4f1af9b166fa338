"""The MS-COCO protocol on a fake COCO folder (JPEG references of odd sizes, a captions json):
caption sampling, fail-fast lines, and `eval=coco30k` end to end (tiny-CLIP space for speed; the
Inception FID run is `slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_builders import all_filled, compose_eval

torch.set_num_threads(2)


def make_fake_coco(root: Path, n_images: int = 6, captions_per_image: int = 2) -> Path:
    """root/annotations/captions_val2014.json + root/val2014/*.jpg (640x480-like aspect, small)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k in range(n_images):
        image_id = 1000 + 7 * k
        name = f"COCO_val2014_{image_id:012d}.jpg"
        arr = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "val2014" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
        for c in range(captions_per_image):
            annotations.append(
                {"id": 10 * image_id + c, "image_id": image_id, "caption": f"A photo number {k} variant {c}.\n"}
            )
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    return root


def test_coco_prompts_are_distinct_images_fixed_by_the_seed(tmp_path):
    from cm3leon.eval.generation import coco_prompts

    root = make_fake_coco(tmp_path)
    js = root / "annotations" / "captions_val2014.json"
    a = coco_prompts(js, 4, seed=0, images_dir=root / "val2014")
    assert a == coco_prompts(js, 4, seed=0, images_dir=root / "val2014")
    assert a != coco_prompts(js, 4, seed=1, images_dir=root / "val2014")
    assert [p.index for p in a] == [0, 1, 2, 3]
    assert len({p.reference for p in a}) == 4 and all(Path(p.reference).is_file() for p in a)
    for p in a:  # each caption belongs to its image; whitespace normalised
        k = (int(Path(p.reference).stem.split("_")[-1]) - 1000) // 7
        assert p.caption.startswith(f"A photo number {k} variant") and "\n" not in p.caption
    with pytest.raises(ValueError, match="fewer than n_captions=7"):
        coco_prompts(js, 7)


def coco_overrides(run: dict, root: Path, log_dir: Path, n: int = 3) -> list[str]:
    clip = str(run["clip"])
    return [
        "eval=coco30k",
        f"ckpt={run['ckpt']}",
        f"eval.root={root}",
        f"paths.log_dir={log_dir}",
        f"cache_dir={log_dir / 'cache'}",
        f"eval.n_captions={n}",
        "eval.resolution=64",
        "eval.samples_per_caption=1",
        "eval.rerank.model_name=world-tiny-clip",
        f"eval.rerank.pretrained={clip}",
        "eval.clip_score.model_name=world-tiny-clip",
        f"eval.clip_score.pretrained={clip}",
        "progress=false",
        "fid.kid_subsets=5",
        "fid.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
    ]


def test_coco_preflight_names_the_missing_data(tiny_eval_run, tmp_path):
    import eval_fid

    base = coco_overrides(tiny_eval_run, tmp_path / "no_coco", tmp_path / "logs") + [
        "eval.metric=tiny_clip",
        "+eval.feature_clip.model_name=world-tiny-clip",
        f"+eval.feature_clip.pretrained={tiny_eval_run['clip']}",
    ]
    with pytest.raises(eval_fid.UsageError, match=r"captions_json .*captions_val2014.json not found.*eval.root=DIR"):
        eval_fid.run(compose_eval(base))
    root = make_fake_coco(tmp_path / "coco")
    with pytest.raises(eval_fid.UsageError, match="checkpoint .* not found"):
        eval_fid.run(
            compose_eval(
                coco_overrides(tiny_eval_run, root, tmp_path / "logs")[:1]
                + base[2:]
                + [f"eval.root={root}", "ckpt=/nonexistent.ckpt"]
            )
        )


def test_coco_eval_end_to_end_in_tiny_clip_space(tiny_eval_run, tmp_path):
    """The coco30k flow (sampling, JPEG references resized by the protocol, generation, fid.json) with
    the feature space swapped for the tiny CLIP so that it runs in seconds."""
    import eval_fid
    from cm3leon.eval.fid import ImageSet

    root = make_fake_coco(tmp_path / "coco")
    cfg = compose_eval(
        coco_overrides(tiny_eval_run, root, tmp_path / "logs")
        + [
            "eval.metric=tiny_clip",
            "+eval.feature_clip.model_name=world-tiny-clip",
            f"+eval.feature_clip.pretrained={tiny_eval_run['clip']}",
        ]
    )
    out = eval_fid.run(cfg)
    assert all_filled(out) == []
    assert out["n"] == 3 and out["generated_now"] == 3 and "fd_tiny_clip" in out
    assert "3 sampled images" in out["reference_set"]
    assert out["resize"] == "PIL lanczos short side to 64, centre crop 64x64"
    refs = [
        json.loads(s)["reference"] for s in (Path(out["images_dir"]).parent / "prompts.jsonl").read_text().splitlines()
    ]
    assert out["reference_set_hash"] == ImageSet(refs).content_hash()


@pytest.mark.slow
def test_coco_eval_with_inception_fid(tiny_eval_run, tmp_path):
    """The paper's metric end to end: torch-fidelity Inception FID + KID (random weights file)."""
    import eval_fid
    from test_eval_fid import random_inception_weights

    weights = tmp_path / "inception.pth"
    random_inception_weights(weights)
    root = make_fake_coco(tmp_path / "coco")
    cfg = compose_eval(coco_overrides(tiny_eval_run, root, tmp_path / "logs") + [f"fid.inception_weights={weights}"])
    out = eval_fid.run(cfg)
    assert all_filled(out) == []
    assert out["fid"] > 0 and "kid_mean" in out and out["evaluator"] == "torch-fidelity"
    assert out["feature_extractor"] == "torch-fidelity inception-v3-compat"
    assert out["feature_extractor_layer"] == "2048 (pool3)"
    again = eval_fid.run(cfg)
    assert again["reference_cached"] and again["generated_now"] == 0 and again["fid"] == pytest.approx(out["fid"])
