"""Build the retrieval files beside the token shards (Hydra: conf/build_index.yaml).

    python src/build_index.py                       # the embedded world: data/world/tokens/retrieval
    python src/build_index.py tokens_dir=/data/tokens embedded_world=false \
        retrieval.encoder.model_name=ViT-B-32 retrieval.encoder.pretrained=laion2b_s34b_b79k \
        retrieval.index.kind=ivfpq retrieval.encoder.device=cuda

Steps (`cm3leon.retrieval.neighbours.build_retrieval`): embed every pair of `{tokens_dir}/{split}`
with the CLIP document encoder (captions from the token shards, images from the raw shards they
were made from), index the bank split's document vectors with FAISS, select each pair's
neighbours (2 by image + 2 by text, the paper's rules), and write the bank's token store.
Output: `{tokens_dir}/retrieval/` (or retrieval.dir), built in a `.tmp` folder beside it and renamed
when complete; the run ends with one JSON summary line. Files that match the token shards and the
config are reused; files of other inputs are replaced only with `overwrite=true`.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPU: do not spin idle OpenMP threads

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry


@hydra_entry("build_index", __file__)
def main(cfg: DictConfig) -> None:
    import logging

    import faiss
    import torch

    from cm3leon.retrieval.neighbours import build_retrieval

    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every factory step at INFO
    if cfg.embedded_world:
        from cm3leon.data.embedded import ensure_embedded_tokens

        ensure_embedded_tokens(cfg.world, cfg.tokens_dir, cfg.shipped_dir)
    else:  # real data: the world's tiny CLIP would make a meaningless memory bank
        from cm3leon.lit.checks import warn_world_clip

        warn_world_clip("retrieval.encoder", cfg.retrieval.encoder, "embedded_world=false")
    # a missing file: one line (cm3leon.cli); the embedded world's own files follow its tokens unasked
    manifest = build_retrieval(cfg.retrieval, cfg.tokens_dir, overwrite=cfg.overwrite or cfg.embedded_world)
    summary = {
        "reused": manifest["reused"],  # true: the files matched the token shards and config; nothing built
        "out": str(cfg.retrieval.dir or f"{cfg.tokens_dir}/retrieval"),
        "encoder": manifest["encoder"]["model_name"],
        "bank": manifest["index"]["n"],
        "index": manifest["index"]["factory"],
        "neighbours": manifest["neighbours"],
        "seconds": manifest["seconds"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
