"""Export a training checkpoint as a Hugging Face `OPTForCausalLM` folder, for serving.

    python src/export_hf.py ckpt=RUN/checkpoints/last.ckpt out=export/cm3leon
    python src/export_hf.py ckpt=... out=export/cm3leon dtype=bfloat16 overwrite=true

The folder loads with `OPTForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
(the text BPE); `cm3leon_vocab.json` beside them lays out the image-code and special ids. The
weight mapping, the position offset and what OPT cannot express are in `cm3leon.export_hf`.
"""

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry


@hydra_entry("export_hf", __file__)
def main(cfg: DictConfig) -> None:
    from cm3leon.export_hf import export_hf

    # export_hf checks dtype, out and ckpt before it loads anything
    out = export_hf(cfg.ckpt, cfg.out, cfg.dtype, overwrite=bool(cfg.overwrite), text_tokenizer=cfg.text_tokenizer)
    print(f"wrote {out} (OPTForCausalLM, {cfg.dtype})")


if __name__ == "__main__":
    main()
