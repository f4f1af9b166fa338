"""Paper-shaped token shards and a random memory bank, to exercise the paper recipes without the paper's data.

    python src/make_paper_data.py out_dir=data/paper_shaped n_train=20000 n_val=1000
    python src/train.py experiment=... data.tokens_dir=data/paper_shaped \
        retrieval.encoder.model_name=synthetic-random retrieval.encoder.pretrained=none

See `cm3leon.data.paper_shaped` for the shapes (1,024 codes of 8,192 per image, captions around 20
tokens in a 56,320-entry BPE) and for why the bank's encoder is named `synthetic-random`.
"""

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.data.paper_shaped import make_paper_data


def run(cfg: DictConfig) -> dict:
    """Write the data a composed make_paper_data config describes; print a summary; return the reports."""
    reports = make_paper_data(
        cfg.out_dir, cfg.n_train, cfg.n_val, seed=cfg.seed, shard_size=cfg.shard_size, retrieval=cfg.retrieval
    )
    bank = reports["retrieval"]
    print(
        f"[make_paper_data] wrote {reports['train']['written']} train + {reports['val']['written']} val paper-shaped "
        f"samples ({reports['train']['shards']} + {reports['val']['shards']} shards) and a random bank of "
        f"{bank['index']['n']} documents to {cfg.out_dir}"
    )
    return reports


@hydra_entry("make_paper_data", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
