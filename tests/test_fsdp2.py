"""trainer=fsdp2 on CPU (gloo): two ranks train with FSDP2 (meta init, one unit per block, bf16
compute with fp32 reduce), write a sharded checkpoint, one rank resumes it (another world size),
and convert_checkpoint turns it into full weights that the inference loader reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import run_train, small_run_args

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = [
    "trainer=fsdp2",
    "trainer.accelerator=cpu",
    "trainer.precision=bf16-mixed",
    "+trainer.strategy.process_group_backend=gloo",
    "trainer.limit_val_batches=0",
    "data.num_workers=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.mark.slow  # ~85 s on 2 cores: three training processes and a conversion
def test_fsdp2_trains_resumes_on_another_world_size_and_exports(tiny_tokens, tmp_path):
    run = tmp_path / "run"
    proc = run_train(small_run_args(tiny_tokens, run, *FSDP2, "trainer.devices=2", "trainer.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
    assert len(list(last.glob("*.distcp"))) == 2  # one shard per rank

    # one rank continues the two-rank run: the shards are re-split on load
    proc = run_train(
        small_run_args(tiny_tokens, run, *FSDP2, "trainer.devices=1", "trainer.max_steps=3", "ckpt_path=last")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 3

    # a sharded folder is refused by the inference loader with the command that fixes it
    from cm3leon.errors import UsageError
    from cm3leon.generation.pipeline import load_lm

    with pytest.raises(UsageError, match="convert_checkpoint.py"):
        load_lm(last)
    full = tmp_path / "full.ckpt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/convert_checkpoint.py"), f"src={last}", f"dst={full}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(full, weights_only=True)
    assert ckpt["global_step"] == 3 and "hyper_parameters" in ckpt
    lm, _, _ = load_lm(full)
    for name, t in lm.state_dict().items():  # full, unsharded tensors of the model's own shapes
        assert torch.isfinite(t).all(), name
        assert ckpt["state_dict"][f"model.{name}"].shape == t.shape, name


@pytest.mark.parametrize("recipe", ["paper_350m", "paper_760m", "paper_7b"])
def test_paper_recipes_use_fsdp2_with_sharded_checkpoints(recipe, compose_config):
    cfg = compose_config("train", [f"experiment={recipe}", "data.tokens_dir=/nonexistent"])
    assert cfg.trainer.strategy._target_.endswith("ModelParallelStrategy")
    assert cfg.trainer.strategy.save_distributed_checkpoint is True and cfg.trainer.plugins is None
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.activation_checkpointing is True
