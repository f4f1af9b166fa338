"""Instruction tuning (SFT) evaluation on held-out embedded-world samples (issue 18).

    python src/eval_sft.py ckpt=RUN/checkpoints/last.ckpt                    # every task, 500 val samples each
    python src/eval_sft.py ckpt=... tasks=[edit,vqa] n=100                   # some tasks, fewer samples
    python src/eval_sft.py ckpt=data/shipped/world_lm.safetensors out_dir=logs/eval_sft/base   # the base model
    python src/eval_sft.py ckpt=SFT_RUN/checkpoints/last.ckpt out_dir=logs/eval_sft/sft        # the SFT model
    python src/eval_sft.py compare=[logs/eval_sft/base,logs/eval_sft/sft]    # README table + figure

One checkpoint: each task of `tasks` is prompted with the SFT templates on `n` validation samples
(`sft_world.sft_samples(task, "val", n)`), decoded through `cm3leon.generation.sft` (the functions
`src/generate.py` calls) and scored from pixels or text: edit and control by the pixel checker,
grounded by the checker and its boxes, VQA by exact match, captioning by parsing the caption;
trivial baselines beside (copy the source image; the majority answer per question type). Per-sample
outcomes go to `<out_dir>/<task>/outcomes.jsonl`, the summary to `<out_dir>/sft_eval.json` and
`sft_eval.md`; rerunning the same command resumes (outcomes and images on disk are reused).
`-m ckpt=BASE,SFT` evaluates both (each in its own default out_dir, printed).

Comparison (`compare=[BASE_DIR,SFT_DIR]`): per task, base vs SFT and SFT vs the trivial baseline on
the same samples with the exact McNemar test -> `<compare_dir>/sft.png` (bars ± standard error),
`sft.json`, `sft.md` (the README's table and verdict at `alpha`).

The logic is `cm3leon.eval.sft`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cm3leon.cli import UsageError, hydra_entry  # noqa: F401  (UsageError: what a bad input raises)
from cm3leon.eval.sft import run


@hydra_entry("eval_sft", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
