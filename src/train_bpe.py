"""Train the byte-level BPE text tokenizer on the captions of raw shards.

    python src/train_bpe.py                                   # embedded world -> data/shipped/world_bpe.json
    python src/train_bpe.py input='/data/raw/{000000..000999}.tar' vocab_size=56320 out=data/bpe.json

The paper's text vocabulary is 56,320 entries (PAPER.md section 1); the embedded world's captions
saturate far below that, so the shipped tokenizer is small. Rebuild the shipped one with
`make tokenizers` (or the first command above, with `overwrite=true`, after `python src/make_world.py`).
An existing `out` is replaced only with `overwrite=true` (checked before training); the file is
written under a temporary name and renamed.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.checked_reader import iter_raw_captions
from cm3leon.data.raw_shards import list_shards
from cm3leon.tokenizers.text_tokenizer import check_new_output, train_bpe


@hydra_entry("train_bpe", __file__)
def main(cfg: DictConfig) -> None:
    shards = list_shards(cfg.input)
    check_new_output(cfg.out, cfg.overwrite)  # before training, not after
    skipped: Counter[str] = Counter()
    captions = itertools.islice(iter_raw_captions(shards, skipped), cfg.max_docs)
    tok = train_bpe(captions, cfg.vocab_size, cfg.min_frequency)
    tok.save(cfg.out, overwrite=cfg.overwrite)
    print(
        json.dumps({"out": str(cfg.out), "vocab_size": tok.vocab_size, "shards": len(shards), "skipped": dict(skipped)})
    )


if __name__ == "__main__":
    main()
