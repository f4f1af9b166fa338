"""Convert a trusted checkpoint or weights file into one every loader of the project reads.

    python src/convert_checkpoint.py src=old.ckpt dst=new.ckpt
    python src/convert_checkpoint.py src=RUN/checkpoints/last.ckpt dst=model.safetensors [dtype=bfloat16]

The project loads torch files with `torch.load(weights_only=True)` only (nothing in a file can run
code); a file holding other Python objects (OmegaConf configs, dataclasses, numpy values, a whole
pickled module) is refused with one line pointing here. This script unpickles `src` fully, so it
runs any code the file carries: use it only on files you trust. It writes tensors and plain
containers to `dst` (atomically) and checks that `dst` loads with weights_only=True.
"""

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry


@hydra_entry("convert_checkpoint", __file__)
def main(cfg: DictConfig) -> None:
    from cm3leon.safe_load import convert_checkpoint

    out = convert_checkpoint(cfg.src, cfg.dst, cfg.dtype)
    kind = "weights only, cm3leon.lm_weights" if out.suffix == ".safetensors" else "loads with weights_only=True"
    print(f"wrote {out} ({kind})")


if __name__ == "__main__":
    main()
