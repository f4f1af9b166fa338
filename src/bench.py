"""Hot-path benchmarks, each against its obvious peer in the same run, printed as JSON lines.

    python src/bench.py                 # every section that exists, on cuda when available
    python src/bench.py vq train        # chosen sections
    make bench

Sections: vq (VQGAN encode images/s, tiny and paper256), token_read (training stream vs plain
webdataset decode), train (one forward+backward vs Hugging Face OPT, same dims), retrieval
(approximate vs exact FAISS search), generate (KV-cached sampler vs Hugging Face generate), data_path
(paper-shaped sequences/s one worker core builds vs what one GPU consumes).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout (the library does not know it)

# section -> (module, function, takes a device argument)
SECTIONS = {
    "vq": ("cm3leon.bench.vq", "bench_vq", True),
    "token_read": ("cm3leon.bench.token_read", "bench_token_read", False),
    "train": ("cm3leon.bench.train_step", "bench_train_step", True),
    "retrieval": ("cm3leon.bench.retrieval", "bench_retrieval", True),
    "generate": ("cm3leon.bench.generate", "bench_generate", True),
    "data_path": ("cm3leon.bench.data_path", "bench_data_path", False),
}


def available_sections() -> list[str]:
    return [s for s, (mod, _, _) in SECTIONS.items() if importlib.util.find_spec(mod) is not None]


def _world_vocab_size() -> int:
    """The embedded world's vocabulary with the shipped tokenizers (the tiny model's real setting)."""
    from omegaconf import OmegaConf

    from cm3leon.bench.generate import world_vocab_size

    n_sentinels = int(OmegaConf.load(ROOT / "conf" / "data" / "world.yaml").vocab.n_sentinels)
    return world_vocab_size(ROOT / "data/shipped/world_bpe.json", ROOT / "data/shipped/world_vqgan.ckpt", n_sentinels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"any of {list(SECTIONS)} (default: all available)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in args.sections or available_sections():
        mod, fn, takes_device = SECTIONS[name]
        func = getattr(importlib.import_module(mod), fn)
        t0 = time.perf_counter()
        kwargs = {"conf_dir": ROOT / "conf"} if name in ("train", "generate") else {}
        if name == "generate":
            kwargs["vocab_size"] = _world_vocab_size()
        result = func(args.device, **kwargs) if takes_device else func(**kwargs)
        print(
            json.dumps({"bench": name, "device": args.device, **result, "wall_s": round(time.perf_counter() - t0, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
