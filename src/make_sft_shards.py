"""Instruction data -> SFT token shards, one folder per source and split (cm3leon/data/sft_shards.py).

    python src/make_sft_shards.py data=sft_files ckpt=RUN/checkpoints/last.ckpt       # your JSONL/CSV files
    python src/make_sft_shards.py data=sft_files ckpt=... data.tokens_dir=/data/sft/tokens device=cuda batch_size=256
    python src/make_sft_shards.py data=sft_world seq_len=512                          # the world (training does it too)

Sources are the data config's (`data.sources`: kind, task, files or sizes); the shards go to
`data.tokens_dir/{train,val}/<source>/`. Images are encoded with the checkpoint's tokenizers (the
model to fine-tune must read them), text with its BPE. Rerunning reuses finished shards whose inputs
are unchanged; shards of other tokenizers or inputs are replaced only with `overwrite=true`. Bad rows
(missing file, unreadable image, missing field, over-length) are skipped and counted: one summary line
per source and split.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.preprocess import PreprocessConfig
from cm3leon.data.sft_shards import SftShardMaker, parse_sources, summary_line
from cm3leon.errors import UsageError


def _settings(cfg: DictConfig) -> tuple[str, str, int]:
    """(image tokenizer, text tokenizer, seq_len): explicit values, else the checkpoint's, else the data's."""
    meta, seq_len = {}, cfg.seq_len
    if cfg.ckpt:
        from cm3leon.generation.pipeline import tokenizer_path
        from cm3leon.lit.init_from import init_hparams

        hp = init_hparams(cfg.ckpt)
        meta = hp.get("data_meta") or {}
        seq_len = seq_len or hp["model"].get("max_seq_len")
        image = cfg.image_tokenizer or tokenizer_path(meta, "image_tokenizer")
        text = cfg.text_tokenizer or tokenizer_path(meta, "text_tokenizer")
    else:
        image = cfg.image_tokenizer or cfg.data.get("image_tokenizer")
        text = cfg.text_tokenizer or cfg.data.get("text_tokenizer")
    if not (image and text):
        raise UsageError(
            "no tokenizers: pass ckpt=PATH (the model to fine-tune) or image_tokenizer=... text_tokenizer=..."
        )
    if not seq_len:
        raise UsageError("no seq_len: pass ckpt=PATH (its max_seq_len) or seq_len=N")
    return str(image), str(text), int(seq_len)


@hydra_entry("make_sft_shards", __file__)
def main(cfg: DictConfig) -> None:
    image, text, seq_len = _settings(cfg)
    pcfg = PreprocessConfig(
        image_tokenizer=image,
        text_tokenizer=text,
        device=cfg.device,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        min_image_side=cfg.min_image_side,
    )
    sources = {n: s for n, s in parse_sources(cfg.data.sources).items() if s.weight > 0}
    if cfg.sources is not None:
        unknown = sorted(set(cfg.sources) - set(sources))
        if unknown:
            raise UsageError(f"sources={unknown} are not in data.sources with weight > 0: {sorted(sources)}")
        sources = {n: sources[n] for n in cfg.sources}
    todo = [(src, split) for split in cfg.splits for src in sources.values() if src.has(split)]
    maker = SftShardMaker(cfg.data.tokens_dir, pcfg, seq_len, int(cfg.data.shard_size), cfg.overwrite, cfg.progress)
    t0 = time.time()
    for report in maker.make(todo):
        print(summary_line(report), flush=True)
    print(f"[sft] {len(todo)} source splits in {cfg.data.tokens_dir}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
