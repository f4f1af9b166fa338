"""Export a CM3Leon checkpoint as a Hugging Face `OPTForCausalLM` folder, for serving tools people run.

    export_hf("RUN/checkpoints/last.ckpt", "export/cm3leon-350m", dtype="bfloat16")
    # python src/export_hf.py ckpt=RUN/checkpoints/last.ckpt out=export/cm3leon-350m dtype=bfloat16

    model = OPTForCausalLM.from_pretrained("export/cm3leon-350m")      # the same logits as CM3LeonLM
    tok = AutoTokenizer.from_pretrained("export/cm3leon-350m")          # the text BPE; `</s>` first

CM3Leon's decoder is OPT's (metaseq lineage): pre-LN, LayerNorm without learnable parameters, no
biases, learned absolute positions, ReLU FFN, a final LN, tied embeddings. OPT expresses it with
`enable_bias=False`, `layer_norm_elementwise_affine=False`, `do_layer_norm_before=True`,
`word_embed_proj_dim=hidden_size` (no projections). The folder holds:

- `config.json` (`OPTConfig`), `model.safetensors` (in 5 GB shards with an index when larger),
  `generation_config.json` (stops at `</s>` or `<eoss>`);
- `tokenizer.json` + `tokenizer_config.json`: the text BPE the checkpoint's token shards were made
  with, as a `PreTrainedTokenizerFast`; with special tokens on (the default) it prepends `</s>`,
  which starts every CM3Leon sequence (as OPT's tokenizer does); padding on the left;
- `cm3leon_vocab.json`: the whole id table (`cm3leon.vocab`): text ids, the reserved gap, image
  codes (id = image_offset + code), `<break>`, `<eoss>`, `<sentinel:i>`, padding rows, and the
  image tokenizer the codes belong to. The tokenizer covers the text ids only: a server builds the
  other ids from this file (e.g. `</s> caption <break>`, then `image.tokens_per_image` image ids).

Weight mapping (ours -> OPTForCausalLM; L = layer, C = d_model):

    tok_emb.weight (x embed_scale when untied)  -> model.decoder.embed_tokens.weight
    pos_emb.weight [P, C]                        -> model.decoder.embed_positions.weight [P + 2, C]:
                                                    two zero rows, then ours
    blocks.L.attn.qkv.weight [3C, C]             -> layers.L.self_attn.{q,k,v}_proj.weight (rows
                                                    [0, C), [C, 2C), [2C, 3C)); .bias alike
    blocks.L.attn.out_proj                       -> layers.L.self_attn.out_proj
    blocks.L.ln1 / ln2 (affine norms only)       -> layers.L.self_attn_layer_norm / final_layer_norm
    blocks.L.mlp.fc1 / fc2                       -> layers.L.fc1 / fc2
    ln_f (affine norms only)                     -> model.decoder.final_layer_norm
    lm_head.weight (untied only)                 -> lm_head.weight

The position offset: `OPTLearnedPositionalEmbedding` has `max_position_embeddings + 2` rows and looks
up row `position + 2`, position being `cumsum(attention_mask) - 1` over the row (or the
`position_ids` given, as `generate` passes them): a left-padded row's first real token is position
0, like our KV cache's left padding. So our row p becomes HF row p + 2; HF rows 0 and 1 (only pad
tokens reach row 1) are zeros. Attention matches ours: OPT scales q by head_dim^-0.5 before q.k
(ours: SDPA's default scale, the same 1/sqrt(head_dim)).

What else maps exactly: post-LN (`pre_ln=false`: OPT's `do_layer_norm_before=False`, no final LN,
as ours), no final LN (`_remove_final_layer_norm`), affine LayerNorm (a zero bias when ours has
none), biases, GELU (exact erf in both), untied embeddings, `pos_emb=none` (a zero position
table; OPT keeps a length limit of max_seq_len), `embed_scale` with untied embeddings (folded
into the input table). Refused with one line, because OPT cannot express it: RMSNorm, a norm eps
other than 1e-5 (OPT's LayerNorms use PyTorch's default eps), `embed_scale != 1` with tied
embeddings (OPT does not scale embeddings, and the tied table is also the output head).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cm3leon.errors import UsageError
from cm3leon.model import CM3LeonLM, ModelConfig
from cm3leon.utils import atomic_path
from cm3leon.vocab import TEXT_SPECIAL_TOKENS, Vocab

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset: HF row = our position + 2
OPT_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every OPT LayerNorm uses
VOCAB_FILE = "cm3leon_vocab.json"
MAX_SHARD_SIZE = "5GB"  # larger models: model-0000i-of-0000n.safetensors + model.safetensors.index.json
SEQUENCE_LAYOUT = "</s> [T <break> I <break>]* Tq <break> Iq </s>"  # cm3leon.data.sequences


# ---- checks ---------------------------------------------------------------------------------
def unsupported(cfg: ModelConfig) -> list[str]:
    """What of `cfg` an OPTForCausalLM cannot express (empty: exportable)."""
    problems = []
    if cfg.norm == "rmsnorm":
        problems.append("model.norm=rmsnorm (OPT has LayerNorm only)")
    if cfg.norm_eps != OPT_LAYER_NORM_EPS:
        problems.append(f"model.norm_eps={cfg.norm_eps} (OPT's LayerNorm eps is fixed at {OPT_LAYER_NORM_EPS})")
    if cfg.embed_scale != 1.0 and cfg.tie_embeddings:
        problems.append(
            f"model.embed_scale={cfg.embed_scale} with tied embeddings (OPT does not scale embeddings; "
            "untied, the scale is folded into the input table)"
        )
    return problems


def check_exportable(cfg: ModelConfig) -> None:
    """A one-line UsageError naming every setting OPT cannot express."""
    problems = unsupported(cfg)
    if problems:
        raise UsageError(f"cannot export to OPTForCausalLM: {'; '.join(problems)}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) not in DTYPES:
        raise UsageError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[str(dtype)]


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """The output folder; a UsageError when it exists, is not empty and `overwrite` is off."""
    if not out_dir:
        raise UsageError("no output folder given: pass out=DIR")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty: pass overwrite=true to replace it, or choose another out=DIR")
    return out


# ---- config and weights ---------------------------------------------------------------------
def opt_config(cfg: ModelConfig, vocab: Vocab | None = None, dtype: torch.dtype = torch.float32):
    """The `OPTConfig` of our architecture (see the module docstring). Without `vocab` (benchmarks
    of random models): the vocabulary size is the model's and the special ids are the layout's."""
    from transformers import OPTConfig

    from cm3leon.vocab import EOS_ID, PAD_ID

    check_exportable(cfg)
    if vocab is not None and cfg.vocab_size != vocab.size:
        raise UsageError(f"model.vocab_size={cfg.vocab_size} differs from the vocabulary's {vocab.size} rows")
    return OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        ffn_dim=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        do_layer_norm_before=cfg.pre_ln,
        _remove_final_layer_norm=cfg.pre_ln and not cfg.final_ln,
        word_embed_proj_dim=cfg.d_model,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        activation_function=cfg.activation,
        enable_bias=cfg.bias,
        layer_norm_elementwise_affine=cfg.norm == "layernorm",
        tie_word_embeddings=cfg.tie_embeddings,
        init_std=cfg.init_std,
        pad_token_id=PAD_ID if vocab is None else vocab.pad_id,
        bos_token_id=EOS_ID if vocab is None else vocab.eos_id,  # every CM3Leon sequence starts with </s>, as OPT's do
        eos_token_id=EOS_ID if vocab is None else vocab.eos_id,
        dtype=str(dtype).removeprefix("torch."),
    )


def _norm_weights(ours: Mapping[str, torch.Tensor], src: str, dst: str, d_model: int) -> dict[str, torch.Tensor]:
    """An affine LayerNorm's weight and bias (a zero bias when ours has none: bias=false)."""
    bias = ours.get(f"{src}.bias")
    return {f"{dst}.weight": ours[f"{src}.weight"], f"{dst}.bias": torch.zeros(d_model) if bias is None else bias}


def opt_state_dict(model: CM3LeonLM) -> dict[str, torch.Tensor]:
    """Our weights under OPTForCausalLM's names, in our dtype (the mapping in the module docstring)."""
    cfg = model.config
    check_exportable(cfg)
    ours = model.state_dict()
    C = cfg.d_model
    tok = ours["tok_emb.weight"]
    if cfg.embed_scale != 1.0:  # untied only (check_exportable): the input table alone is scaled
        tok = tok * cfg.embed_scale
    pos = ours["pos_emb.weight"] if cfg.pos_emb == "learned" else torch.zeros(cfg.max_seq_len, C, dtype=tok.dtype)
    dec = "model.decoder"
    sd = {
        f"{dec}.embed_tokens.weight": tok,
        f"{dec}.embed_positions.weight": torch.cat([torch.zeros(POSITION_OFFSET, C, dtype=pos.dtype), pos]),
        "lm_head.weight": tok if cfg.tie_embeddings else ours["lm_head.weight"],
    }
    affine = cfg.norm == "layernorm"
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"{dec}.layers.{i}"
        for kind in ("weight", "bias"):
            qkv = ours.get(f"{src}.attn.qkv.{kind}")
            if qkv is not None:
                for name, part in zip("qkv", qkv.split(C, dim=0), strict=True):
                    sd[f"{dst}.self_attn.{name}_proj.{kind}"] = part
            for s, d in (("attn.out_proj", "self_attn.out_proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                if f"{src}.{s}.{kind}" in ours:
                    sd[f"{dst}.{d}.{kind}"] = ours[f"{src}.{s}.{kind}"]
        if affine:
            sd |= _norm_weights(ours, f"{src}.ln1", f"{dst}.self_attn_layer_norm", C)
            sd |= _norm_weights(ours, f"{src}.ln2", f"{dst}.final_layer_norm", C)
    if affine and cfg.pre_ln and cfg.final_ln:
        sd |= _norm_weights(ours, "ln_f", f"{dec}.final_layer_norm", C)
    return sd


def build_opt(model: CM3LeonLM, vocab: Vocab, dtype: torch.dtype = torch.float32):
    """An `OPTForCausalLM` holding `model`'s weights in `dtype` (made on the meta device, then the
    weights assigned: no random init, no second copy; a strict load checks every name)."""
    from transformers import OPTForCausalLM

    config = opt_config(model.config, vocab, dtype)
    sd = {k: v.detach().to(dtype=dtype, device="cpu").contiguous() for k, v in opt_state_dict(model).items()}
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
    with torch.device("meta"):
        hf = OPTForCausalLM(config)
    hf.load_state_dict(sd, strict=True, assign=True)
    return hf.eval()


# ---- generation config, vocabulary, tokenizer ----------------------------------------------
def generation_config(vocab: Vocab):
    """Greedy by default; stops at `</s>` (end of a sequence) or `<eoss>` (end of an infilled span).
    No max_length: config.max_position_embeddings is the limit (a server's own setting wins)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=vocab.eos_id,
        eos_token_id=[vocab.eos_id, vocab.eoss_id],
        pad_token_id=vocab.pad_id,
    )


def vocab_layout(vocab: Vocab, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole id table as JSON (`cm3leon_vocab.json`): which ids are text, image codes, specials.
    Ranges are half-open [lo, hi)."""
    meta = dict(meta or {})
    lo, hi = vocab.image_id_range
    sentinels_end = vocab.first_sentinel_id + vocab.n_sentinels
    return {
        "format": "cm3leon-vocab/1",
        "vocab": vocab.to_dict(),  # cm3leon.vocab.Vocab.from_dict(this) rebuilds the table
        "size": vocab.size,
        "sequence_layout": SEQUENCE_LAYOUT,
        "sequence_start_id": vocab.eos_id,
        "text": {
            "ids": [0, vocab.text_size],
            "bos_id": vocab.bos_id,
            "pad_id": vocab.pad_id,
            "eos_id": vocab.eos_id,
            "unk_id": vocab.unk_id,
            "special_tokens": list(TEXT_SPECIAL_TOKENS),
        },
        "reserved_ids": [vocab.text_size, vocab.image_offset],  # never produced
        "image": {
            "ids": [lo, hi],
            "offset": vocab.image_offset,  # id = offset + code
            "n_codes": vocab.n_image_codes,
            "tokens_per_image": meta.get("tokens_per_image"),
            "tokenizer": meta.get("image_tokenizer"),  # the VQGAN the codes belong to
        },
        "break_id": vocab.break_id,
        "eoss_id": vocab.eoss_id,
        "sentinels": {
            "first_id": vocab.first_sentinel_id,
            "n": vocab.n_sentinels,
            "ids": [vocab.first_sentinel_id, sentinels_end],
        },
        "padding_ids": [sentinels_end, vocab.size],  # embedding rows never used
    }


def save_tokenizer(text_path: str | Path, out_dir: Path, vocab: Vocab, max_len: int) -> None:
    """Our text BPE as a `PreTrainedTokenizerFast` folder: `</s>` prepended with special tokens on,
    left padding with `<pad>`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from cm3leon.tokenizers.text_tokenizer import TextTokenizer

    bpe = TextTokenizer.from_file(text_path).tokenizer  # checks the special tokens' ids
    if bpe.get_vocab_size() > vocab.text_size:
        raise UsageError(
            f"text tokenizer {text_path} has {bpe.get_vocab_size()} ids but the model's table has {vocab.text_size} "
            "text ids; pass the text_tokenizer=PATH the token shards were made with"
        )
    bpe = Tokenizer.from_str(bpe.to_str())
    _, pad, eos, unk = TEXT_SPECIAL_TOKENS  # <s> is not used: sequences start with </s>
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A $B", special_tokens=[(eos, vocab.eos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=eos,  # what starts a sequence (OPT's convention too)
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        padding_side="left",
        model_max_length=max_len,
    )
    tok.save_pretrained(str(out_dir))
    # transformers 5 names its class TokenizersBackend; the alias loads in 4.x servers too
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# ---- the export ------------------------------------------------------------------------------
def export_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    *,
    overwrite: bool = False,
    text_tokenizer: str | Path | None = None,
) -> Path:
    """Write an OPTForCausalLM folder for the training checkpoint `ckpt_path` (see the module
    docstring). The folder is written beside `out_dir` and renamed into place (`atomic_path`); an
    existing non-empty `out_dir` is replaced only with `overwrite`. `text_tokenizer` overrides the
    BPE file the checkpoint records. Returns `out_dir`."""
    from cm3leon.generation.pipeline import check_checkpoint, load_lm, tokenizer_path

    check_checkpoint(ckpt_path)  # the arguments first: a wrong one answers before any loading
    out = check_output(out_dir, overwrite)
    torch_dtype = resolve_dtype(dtype)
    model, vocab, meta = load_lm(ckpt_path)
    check_exportable(model.config)
    text_path = tokenizer_path(meta, "text_tokenizer", text_tokenizer)
    hf = build_opt(model, vocab, torch_dtype)
    hf.generation_config = generation_config(vocab)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        hf.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
        save_tokenizer(text_path, tmp, vocab, model.config.max_seq_len)
        layout = vocab_layout(vocab, meta)
        layout["export"] = {
            "ckpt": str(Path(ckpt_path).expanduser().resolve()),
            "text_tokenizer": str(text_path),
            "model": model.config.to_dict(),
            "position_offset": POSITION_OFFSET,
        }
        (tmp / VOCAB_FILE).write_text(json.dumps(layout, indent=1) + "\n")
    return out
