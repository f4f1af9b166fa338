"""Generate the embedded synthetic world: raw shards OUT/{train,val}/NNNNNN.tar + OUT/manifest.json.

    python src/make_world.py                       # conf/make_world.yaml: 20,000 + 1,000 pairs
    python src/make_world.py n_train=2000 out_dir=/tmp/world/raw

Idempotent: a complete world matching the config is left alone; partial output is regenerated; a
world of another config in out_dir is replaced only with `overwrite=true` (written in OUT.tmp, then
renamed into place).
Training and build_index generate it on first use themselves (`cm3leon.data.world.ensure_world`).
"""

import json
import time

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.world import generate_world, world_config, world_is_complete


def run(cfg: DictConfig) -> None:
    """Generate the world described by a composed make_world config (or say it is already there)."""
    wcfg = world_config(cfg)
    if world_is_complete(wcfg):
        print(f"[world] already complete at {wcfg.out_dir} (manifest matches the config); nothing to do")
        return
    t0 = time.time()
    manifest = generate_world(wcfg, overwrite=cfg.overwrite)
    print(
        f"[world] wrote {json.dumps(manifest['counts'])} pairs in "
        f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards to {wcfg.out_dir} "
        f"in {time.time() - t0:.1f}s"
    )


@hydra_entry("make_world", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
