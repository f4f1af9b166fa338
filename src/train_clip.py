"""Train the tiny open_clip model of the embedded world (Hydra: conf/train_clip.yaml).

Rebuild the shipped retriever weights (data/shipped/world_clip.pt, ~1 MB; minutes on 2 CPU cores):

    .venv/bin/python src/train_clip.py

The model is open_clip's `CLIP` with the config registered by `cm3leon.retrieval.tiny_clip`
(`world-tiny-clip`), trained with open_clip's `ClipLoss` on the world's 20,000 training pairs,
scored by text->image and image->text recall@k on the 1,000 validation pairs. The file is
written only when val text->image recall@5 reaches `min_recall_at_5` (the retrieval acceptance
needs >= 0.8). It holds {'state_dict', 'model_name', 'model_cfg', 'metrics', 'train_cfg'}: open_clip
reads it directly (`create_model_and_transforms(TINY_CLIP, pretrained=path)`).

The training lives in `cm3leon.retrieval.clip_training` (a plain loop; why: see there).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin idle OpenMP threads

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.retrieval.clip_training import train_clip


@hydra_entry("train_clip", __file__)
def main(cfg: DictConfig) -> None:
    train_clip(cfg)


if __name__ == "__main__":
    main()
