"""Issue 14 item 4: loading a file never executes code from it.

Every loader is handed a "pickle bomb": a torch file holding an object whose unpickling creates a
marker file. A loader that unpickles it runs that code; a safe one (torch.load weights_only=True)
refuses it with one line naming the file and the way out. The project's own files still load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cm3leon.errors import UsageError
from project import PROJECT_ROOT, SHIPPED_DIR


class _Bomb:
    """Unpickling it calls open(marker, "w"): code run by the loader."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_bomb(path: Path, payload: dict) -> tuple[Path, Path]:
    """Save `payload` plus a bomb to `path`; returns (path, marker)."""
    marker = path.with_suffix(".executed")
    torch.save({**payload, "extra": _Bomb(marker)}, path)
    return path, marker


def assert_refused(excinfo, path: Path, marker: Path) -> None:
    message = str(excinfo.value)
    assert not marker.exists(), "the loader ran code from the file"
    assert "\n" not in message and str(path) in message, message
    assert "weights_only" in message or "code" in message, message


def test_inference_loader_refuses_code_and_loads_plain_checkpoints(tiny_eval_run, tmp_path):
    from cm3leon.generation.pipeline import checkpoint_meta, load_lm

    plain = torch.load(tiny_eval_run["ckpt"], map_location="cpu", weights_only=True)
    bomb, marker = make_bomb(tmp_path / "lm.ckpt", plain)
    for load in (load_lm, checkpoint_meta):
        with pytest.raises(UsageError) as e:
            load(bomb)
        assert_refused(e, bomb, marker)
    model, vocab, meta = load_lm(tiny_eval_run["ckpt"])  # the project's own checkpoint still loads
    assert vocab.size == model.config.vocab_size and meta["tokens_per_image"] == 64
    assert checkpoint_meta(tiny_eval_run["ckpt"]) == meta


def test_hyperparameters_are_saved_as_plain_containers(tmp_path):
    """A module built from OmegaConf nodes (as a notebook would) still writes a checkpoint that
    loads with weights_only=True: the hyperparameters are plain dicts and lists."""
    import lightning as L
    from omegaconf import OmegaConf

    from cm3leon.lit.lm_module import CM3LeonLitModule
    from cm3leon.vocab import Vocab

    vocab = Vocab(text_size=100, n_image_codes=64, n_sentinels=4)
    module = CM3LeonLitModule(
        model=OmegaConf.create(dict(name="t", n_layer=1, d_model=32, n_head=2, max_seq_len=32)),
        vocab=vocab.to_dict(),
        optim=OmegaConf.create(dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)),
        data_meta=OmegaConf.create({"tokens_per_image": 16}),
    )
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["n_layer"] == 1


def test_image_tokenizer_refuses_code_without_falling_back(tmp_path):
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer, read_vq_state_dict

    shipped = torch.load(SHIPPED_DIR / "world_vqgan.ckpt", map_location="cpu", weights_only=True)
    bomb, marker = make_bomb(tmp_path / "vq.ckpt", shipped)
    (tmp_path / "vq.yaml").write_text((SHIPPED_DIR / "world_vqgan.yaml").read_text())
    for load in (ImageTokenizer.from_checkpoint, read_vq_state_dict):
        with pytest.raises(UsageError) as e:
            load(bomb)
        assert_refused(e, bomb, marker)


def test_clip_weights_refuse_code(tmp_path):
    from cm3leon.retrieval.clip_encoder import DocumentEncoder
    from cm3leon.retrieval.tiny_clip import TINY_CLIP

    shipped = torch.load(SHIPPED_DIR / "world_clip.pt", map_location="cpu", weights_only=True)
    bomb, marker = make_bomb(tmp_path / "clip.pt", {"state_dict": shipped})
    with pytest.raises(UsageError) as e:
        DocumentEncoder(TINY_CLIP, pretrained=bomb, device="cpu")
    assert_refused(e, bomb, marker)


def test_inception_weights_refuse_code(tmp_path):
    from cm3leon.eval.fid import InceptionSpace

    bomb, marker = make_bomb(tmp_path / "inception.pth", {})
    with pytest.raises(UsageError) as e:
        InceptionSpace(weights_path=bomb, download=False, device="cpu")
    assert_refused(e, bomb, marker)


def test_training_resume_refuses_code(tiny_tokens, tmp_path):
    """`ckpt_path=` of a file from elsewhere: one line, exit 2, nothing executed."""
    from cm3leon.lit.checkpoint_io import AtomicCheckpointIO

    bomb, marker = make_bomb(tmp_path / "last.ckpt", {"global_step": 3})
    with pytest.raises(UsageError) as e:
        AtomicCheckpointIO().load_checkpoint(bomb)
    assert_refused(e, bomb, marker)

    from test_train import run_train, small_run_args

    proc = run_train(small_run_args(tiny_tokens, tmp_path / "run", "trainer.max_steps=2", f"ckpt_path={bomb}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bomb) in lines[0], proc.stderr[-3000:]
    assert not marker.exists()


def test_convert_command_makes_a_refused_checkpoint_loadable(tiny_eval_run, tmp_path):
    """The way out the refusal names: `src/convert_checkpoint.py` re-saves a trusted file (one
    with OmegaConf hyperparameters, as older notebooks wrote) as plain containers."""
    from omegaconf import OmegaConf

    from cm3leon.generation.pipeline import load_lm

    ckpt = torch.load(tiny_eval_run["ckpt"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = {
        k: OmegaConf.create(v) if isinstance(v, dict) else v for k, v in ckpt["hyper_parameters"].items()
    }
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(UsageError, match="convert_checkpoint"):
        load_lm(old)
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "convert_checkpoint.py"), f"src={old}", f"dst={new}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, _, meta = load_lm(new)
    assert meta["tokens_per_image"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.ckpt", "old.ckpt"]  # no Hydra folders left
