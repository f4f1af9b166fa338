"""Zero-shot FID of a CM3Leon checkpoint (PAPER.md section 6): `make eval-fid ARGS="ckpt=PATH eval=..."`.

    python src/eval_fid.py ckpt=RUN/checkpoints/last.ckpt eval=coco30k   # MS-COCO FID-30K (the paper's)
    python src/eval_fid.py ckpt=RUN/checkpoints/last.ckpt eval=embedded  # the embedded world (CPU)
    python src/eval_fid.py ckpt=... eval=coco30k fid.inception_weights=PATH eval.root=/data/coco

The evaluation lives in `cm3leon.eval.evaluate` (this script composes the config and calls it).
Steps: (1) check that everything needed is there (feature-extractor weights, data, checkpoint) and
stop with one line naming what is missing; (2) sample the captions (fixed seed); (3) generate the
missing images, best of N by CLIP score, over all devices with Lightning predict (images already on
disk are kept); (4) on rank 0 compute the metrics (features of each image set cached by content
hash) and write `<out_dir>/fid.json`, printing it as one JSON line.

fid.json records: the metric(s) (coco30k: fid, kid; embedded: fd_tiny_clip, kd_tiny_clip, caption
accuracy), clip_score, n, evaluator + version, feature extractor + weights hash, resize protocol,
reference set + hash, decoding settings (+ samples per caption, re-ranking, retrieval, seed),
checkpoint path + sha256.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cm3leon.cli import UsageError, hydra_entry  # noqa: F401  (UsageError: what a bad input raises)
from cm3leon.eval.evaluate import evaluate as run
from cm3leon.eval.evaluate import generation_settings, settings_hash  # noqa: F401  (tests, notebooks)


@hydra_entry("eval_fid", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
