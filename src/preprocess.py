"""Raw shards -> token shards (caption, BPE ids, VQ image codes), per split.

    python src/preprocess.py                                  # the embedded world (data/world/raw -> data/world/tokens)
    python src/preprocess.py raw_dir=/data/raw out_dir=/data/tokens splits=[train,val] \
        image_tokenizer=/ckpt/vqgan.ckpt text_tokenizer=/ckpt/bpe.json device=cuda batch_size=256

Reads `{raw_dir}/{split}` (a folder of NNNNNN.tar in the img2dataset layout), writes
`{out_dir}/{split}/NNNNNN.tar` plus meta.json, per-shard stats and report.json. Rerunning skips
finished shards whose raw shard is unchanged and makes changed ones again (and says so). Token
shards of another tokenizer, or of raw shards no longer given, are replaced only with
`overwrite=true`. Bad samples are skipped and counted; the run ends with one summary line per split.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.preprocess import PreprocessConfig, preprocess_split, summary_line
from cm3leon.data.raw_shards import list_shards


@hydra_entry("preprocess", __file__)
def main(cfg: DictConfig) -> None:
    pcfg = PreprocessConfig(
        image_tokenizer=cfg.image_tokenizer,
        text_tokenizer=cfg.text_tokenizer,
        device=cfg.device,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        min_image_side=cfg.min_image_side,
    )
    for split in cfg.splits:  # every split's raw shards exist before any is tokenized
        list_shards(f"{cfg.raw_dir}/{split}")
    for split in cfg.splits:
        report = preprocess_split(
            f"{cfg.raw_dir}/{split}", f"{cfg.out_dir}/{split}", pcfg, progress=cfg.progress, overwrite=cfg.overwrite
        )
        print(summary_line(report))


if __name__ == "__main__":
    main()
