"""Weights-only model files (cm3leon.lm_weights): written by convert_checkpoint, read by the one
inference loader, tokenizer paths relative to the file so a shipped model works in any clone."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cm3leon.errors import UsageError
from cm3leon.generation.pipeline import checkpoint_meta, load_lm

ROOT = Path(__file__).resolve().parents[1]


def test_weights_file_loads_the_same_model_and_moves_with_its_tokenizers(tiny_eval_run, tmp_path):
    from safetensors import safe_open

    from cm3leon.lit.init_from import init_hparams
    from cm3leon.lm_weights import save_lm_weights

    ckpt = tiny_eval_run["ckpt"]
    ref, vocab, meta = load_lm(ckpt)
    # a shipped folder: the weights beside copies of their tokenizers
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for key in ("image_tokenizer", "text_tokenizer"):
        shutil.copy(meta[key]["path"], shipped / Path(meta[key]["path"]).name)
    dst = save_lm_weights(ckpt, shipped / "lm.safetensors", dtype="float32")
    # rewrite the recorded paths as if the tokenizers had been shipped beside it, then move the folder
    with safe_open(str(dst), framework="pt") as f:
        header = json.loads(f.metadata()["cm3leon"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    assert "lm_head.weight" not in tensors  # the tied table once
    for key in ("image_tokenizer", "text_tokenizer"):
        header["hyper_parameters"]["data_meta"][key]["path"] = Path(meta[key]["path"]).name
    from safetensors.torch import save_file

    save_file(tensors, str(dst), metadata={"cm3leon": json.dumps(header)})
    moved = tmp_path / "elsewhere"
    shutil.move(str(shipped), moved)

    model, vocab2, meta2 = load_lm(moved / "lm.safetensors")
    assert vocab2.to_dict() == vocab.to_dict()
    for key in ("image_tokenizer", "text_tokenizer"):
        assert Path(meta2[key]["path"]) == (moved / Path(meta[key]["path"]).name).resolve()
        assert checkpoint_meta(moved / "lm.safetensors")[key]["path"] == meta2[key]["path"]
        # instruction tuning reads the same header (ckpt_init, make_sft_shards ckpt=)
        assert init_hparams(moved / "lm.safetensors")["data_meta"][key]["path"] == meta2[key]["path"]
    idx = torch.randint(4, 100, (2, 12))
    torch.testing.assert_close(model(idx), ref(idx), atol=0, rtol=0)  # fp32: the same weights exactly


def test_convert_command_writes_bf16_weights_that_generate_reads(tiny_eval_run, tmp_path):
    dst = tmp_path / "lm.safetensors"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/convert_checkpoint.py"), f"src={tiny_eval_run['ckpt']}", f"dst={dst}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "weights only" in proc.stdout
    model, _, _ = load_lm(dst)
    ref, _, _ = load_lm(tiny_eval_run["ckpt"])
    for name, t in ref.state_dict().items():  # bf16 on disk: within bf16 rounding of the checkpoint
        torch.testing.assert_close(model.state_dict()[name], t, atol=0, rtol=2**-8)
    assert dst.stat().st_size < 0.6 * sum(t.numel() * 4 for k, t in ref.state_dict().items() if k != "lm_head.weight")


def test_a_foreign_safetensors_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UsageError, match="not a CM3Leon weights file"):
        load_lm(path)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="not readable"):
        load_lm(tmp_path / "broken.safetensors")
