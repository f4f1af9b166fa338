"""Bring your own data: raw shards (img2dataset layout) from a folder, a CSV or a JSONL file.

    python src/make_shards.py input=my_images/ out_dir=data/mine/raw
    python src/make_shards.py input=pairs.jsonl out_dir=data/mine/raw shard_size=5000
    python src/make_shards.py input=pairs.csv out_dir=DIR image_column=file caption_column=text

img2dataset output (tar shards of jpg + txt + json) is already in this layout: skip this step and
point the later stages at those shards. See `cm3leon.data.raw_shards` for the layout and
`cm3leon.data.make_shards` for what is skipped (the raw-sample decoder's reasons). A rerun with the
same inputs writes nothing; shards of another input in `out_dir` are replaced only with
`overwrite=true`.
"""

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.make_shards import make_shards


def run(cfg: DictConfig) -> dict:
    """Write the shards a composed make_shards config describes; print a summary; return the manifest."""
    manifest = make_shards(
        cfg.input,
        cfg.out_dir,
        shard_size=cfg.shard_size,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        key_prefix=cfg.key_prefix,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
    )
    c = manifest["counts"]
    if manifest["reused"]:
        print(f"[make_shards] {cfg.out_dir} is up to date ({c['written']} pairs, same inputs): nothing written")
        return manifest
    reasons = ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in c.items() if k.startswith("skipped_"))
    print(
        f"[make_shards] wrote {c['written']} pairs in {len(manifest['shards'])} shards to {cfg.out_dir}; "
        f"skipped {c['skipped']}"
        + (f" ({reasons})" if reasons else "")
        + ("; re-made because the input's files changed" if manifest["remade"] else "")
    )
    return manifest


@hydra_entry("make_shards", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
