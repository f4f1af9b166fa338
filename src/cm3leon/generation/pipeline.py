"""The one inference loader: checkpoint -> model, vocabulary, tokenizers and retriever.

    pipe = load_pipeline("RUN/checkpoints/last.ckpt", device="cuda", precision="bf16")
    docs = pipe.retrieve(["a large red circle in the top left"])        # None without retrieval
    codes = generate_images(pipe.model, pipe.vocab, [pipe.text_tokenizer.encode(c)], pipe.tokens_per_image,
                            retrieved=docs, decoding=DecodingConfig(guidance_scale=3.0, top_p=0.8))
    images = pipe.image_tokenizer.decode(codes)                           # [N, 3, H, W] in [-1, 1]

`src/generate.py`, FID evaluation (`cm3leon.eval.generation`) and the sampling callback all load
through here (open_clip's `create_model_and_transforms` and gpt-fast's `_load_model` are the
models): one checkpoint reader, one precision map, one tokenizer lookup, one codebook check, one
retrieval set-up.

Retrieval (`retrieval=`, the `conf/retrieval/*.yaml` node; PAPER.md section 4: at inference
retrieval is by the prompt text only):
- None or {k: null, dir: null}: what the checkpoint was trained with (recorded by training as
  data_meta["retrieval"] = {k, folder}); a checkpoint trained without retrieval gets none, and a
  memory bank that is gone gives a warning and none;
- {k: K, dir: DIR}: K documents per prompt from the memory bank DIR (`python src/build_index.py`);
  dir null: the checkpoint's memory bank; k 0: no retrieval;
- any `DocumentSource` object (`cm3leon.retrieval.protocol`) with a `k` attribute.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cm3leon.data.sequences import Document
from cm3leon.errors import UsageError
from cm3leon.model import CM3LeonLM
from cm3leon.retrieval.protocol import DocumentSource, RetrievalQuery
from cm3leon.vocab import Vocab

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere; otherwise one of PRECISIONS."""
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"precision={precision!r} is not one of {['auto', *PRECISIONS]}")
    return PRECISIONS[precision]


def resolve_device(device: str) -> str:
    """`auto` is cuda when available, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else str(device)


def check_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint file, or a UsageError naming what to pass."""
    from cm3leon.safe_load import refuse_sharded

    if not path:
        raise UsageError(
            "no checkpoint given: pass ckpt=PATH (a training run's checkpoints/last.ckpt; `python src/train.py` makes one)"
        )
    p = Path(path).expanduser()
    refuse_sharded(p)
    if not p.is_file():
        raise UsageError(
            f"checkpoint {p} not found: pass ckpt=PATH to an existing .ckpt or .safetensors "
            "(a training run's checkpoints/last.ckpt, `python src/train.py` makes one; the shipped world model: "
            "`make world-model`)"
        )
    return p


def load_lm(ckpt: str | Path) -> tuple[CM3LeonLM, Vocab, dict]:
    """(model in eval mode on CPU without gradients, Vocab, data_meta) from a training checkpoint.

    Read with torch.load(weights_only=True) (a file that would run code is refused, one line) and
    built from the hyperparameters the LightningModule saved (`model`, `vocab`, `data_meta`)."""
    from cm3leon.model import ModelConfig
    from cm3leon.safe_load import load_weights_only

    path = check_checkpoint(ckpt)
    if path.suffix == ".safetensors":  # a weights-only file (cm3leon.lm_weights), e.g. the shipped world model
        from cm3leon.lm_weights import read_lm_weights

        weights, hp = read_lm_weights(path)
    else:
        container = load_weights_only(path, "checkpoint")
        container = container if isinstance(container, Mapping) else {}
        hp = container.get("hyper_parameters") or {}
        if not hp.get("model") or not hp.get("vocab") or "state_dict" not in container:
            raise UsageError(
                f"checkpoint {path} records no model and vocab hyperparameters: not a CM3Leon training checkpoint "
                "(pass ckpt= a training run's checkpoints/last.ckpt)"
            )
        # the LightningModule holds the model as `model.`; other entries (metrics) are not the model's
        weights = {k.removeprefix("model."): v for k, v in container["state_dict"].items() if k.startswith("model.")}
    vocab = Vocab.from_dict(hp["vocab"])
    model = CM3LeonLM(ModelConfig.from_dict(dict(hp["model"]), vocab_size=vocab.size))
    if model.config.tie_embeddings:  # weights files store the tied table once
        weights.setdefault("lm_head.weight", weights["tok_emb.weight"])
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False), vocab, dict(hp.get("data_meta") or {})


def tokenizer_path(meta: Mapping, key: str, given: str | Path | None = None) -> Path:
    """The `key` tokenizer file (image_tokenizer | text_tokenizer): `given`, else the one the
    checkpoint's token shards were made with (recorded in data_meta)."""
    path = given or (meta.get(key) or {}).get("path")
    if not path:
        raise UsageError(f"the checkpoint records no {key}; pass {key}=PATH")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UsageError(f"{key} {p} not found: pass {key}=PATH (the file the token shards were made with)")
    return p


def check_codebook(image_tokenizer, vocab: Vocab, path: str | Path = "") -> None:
    """The image tokenizer must have the codebook the model was trained with."""
    if image_tokenizer.n_codes != vocab.n_image_codes:
        raise UsageError(
            f"image tokenizer {path} has {image_tokenizer.n_codes} codes but the model was trained with "
            f"{vocab.n_image_codes}; pass the matching image_tokenizer=PATH"
        )


def checkpoint_meta(ckpt: str | Path) -> dict:
    """The data meta a training checkpoint records (tokenizers, retrieval), without reading its
    weights into memory (memory-mapped, weights_only load)."""
    from cm3leon.safe_load import load_weights_only

    path = check_checkpoint(ckpt)
    if path.suffix == ".safetensors":
        from cm3leon.lm_weights import read_lm_weights

        return dict(read_lm_weights(path)[1]["data_meta"])
    container = load_weights_only(path, "checkpoint", mmap=True)
    return dict((container.get("hyper_parameters") or {}).get("data_meta") or {})


def retrieval_settings(retrieval: Mapping | None, meta: Mapping) -> dict:
    """Resolve a `conf/retrieval` node against the checkpoint's data meta -> {k, dir} (k 0: none).
    See the module docstring for the rules."""
    node = dict(retrieval or {})
    trained = dict(meta.get("retrieval") or {})
    k = node.get("k")
    k = int(trained.get("k", 0)) if k is None else int(k)
    folder = node.get("dir")
    if k <= 0:
        return {"k": 0, "dir": None}
    if not folder:
        if not trained:
            if node.get("k") is None:
                return {"k": 0, "dir": None}  # trained without retrieval and none asked for
            raise UsageError(
                f"retrieval.k={k} but the checkpoint was trained without retrieval: pass retrieval.dir=<tokens>/retrieval "
                "(a memory bank from `python src/build_index.py`)"
            )
        folder = trained["folder"]
        if not Path(folder).is_dir():
            print(
                f"warning: the checkpoint was trained with retrieval but its memory bank {folder} is gone: generating "
                "without retrieved documents (pass retrieval.dir=<tokens>/retrieval from `python src/build_index.py`)",
                file=sys.stderr,
            )
            return {"k": 0, "dir": None}
    folder = Path(str(folder)).expanduser().resolve()
    if not folder.is_dir():
        raise UsageError(f"retrieval.dir={folder} not found: build the memory bank with `python src/build_index.py`")
    return {"k": k, "dir": str(folder)}


def open_retriever(
    retrieval: Any, meta: Mapping, device: str | None = None, tokenizers: Mapping[str, Path] | None = None
) -> tuple[DocumentSource | None, int]:
    """(document source or None, documents per prompt) for `retrieval` (see the module docstring).
    A memory bank on disk must hold tokens of `tokenizers` ({image_tokenizer, text_tokenizer}: the
    files the model reads and writes tokens with), else one line refuses it."""
    if retrieval is not None and not isinstance(retrieval, Mapping):  # a DocumentSource object
        if not isinstance(retrieval, DocumentSource) or getattr(retrieval, "k", None) is None:
            raise UsageError(f"retrieval={retrieval!r} needs documents(queries, k) and k (documents per prompt)")
        return retrieval, int(retrieval.k)
    settings = retrieval_settings(retrieval, meta)
    if settings["k"] == 0:
        return None, 0
    from cm3leon.retrieval.retriever import Retriever
    from cm3leon.utils import file_sha256

    shas = None if tokenizers is None else {key: file_sha256(path) for key, path in tokenizers.items()}
    return Retriever(settings["dir"], k=settings["k"], device=device, tokenizers=shas), settings["k"]


@dataclass
class Pipeline:
    """Everything inference needs, loaded once (see `load_pipeline`)."""

    model: CM3LeonLM
    vocab: Vocab
    image_tokenizer: Any  # cm3leon.tokenizers.image_tokenizer.ImageTokenizer
    text_tokenizer: Any  # cm3leon.tokenizers.text_tokenizer.TextTokenizer
    retriever: DocumentSource | None = None
    retrieval_k: int = 0
    meta: dict = field(default_factory=dict)
    ckpt: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def tokens_per_image(self) -> int:
        return int(self.image_tokenizer.tokens_per_image)

    def retrieve(self, captions: Sequence[str]) -> list[list[Document]] | None:
        """The documents to put before each caption (retrieval by the prompt text), or None."""
        if self.retriever is None or self.retrieval_k <= 0:
            return None
        return self.retriever.documents([RetrievalQuery(text=c) for c in captions], self.retrieval_k)

    def encode_captions(self, captions: Sequence[str]) -> list:
        """BPE ids per caption."""
        return [self.text_tokenizer.encode(c) for c in captions]


def load_pipeline(
    ckpt: str | Path,
    device: str = "cpu",
    precision: str = "auto",
    image_tokenizer: str | Path | None = None,
    text_tokenizer: str | Path | None = None,
    retrieval: Any = None,
    retrieval_device: str | None = None,
) -> Pipeline:
    """Load a training checkpoint for inference.

    Args:
        ckpt: a CM3LeonLitModule checkpoint (a training run's checkpoints/last.ckpt).
        device: cpu | cuda | cuda:N | auto.
        precision: auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32: the model's weights.
        image_tokenizer, text_tokenizer: files overriding the ones recorded in the checkpoint.
        retrieval: see the module docstring (default: what the checkpoint was trained with).
        retrieval_device: the retriever's CLIP device (default: `device`).
    """
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer

    device = resolve_device(device)
    dtype = resolve_precision(precision, device)
    model, vocab, meta = load_lm(ckpt)
    image_path = tokenizer_path(meta, "image_tokenizer", image_tokenizer)
    text_path = tokenizer_path(meta, "text_tokenizer", text_tokenizer)
    image_tok = ImageTokenizer.from_checkpoint(image_path, device=device)
    check_codebook(image_tok, vocab, image_path)
    tokenizers = {"image_tokenizer": image_path, "text_tokenizer": text_path}
    retriever, k = open_retriever(retrieval, meta, retrieval_device or device, tokenizers)
    return Pipeline(
        model=model.to(device=device, dtype=dtype),
        vocab=vocab,
        image_tokenizer=image_tok,
        text_tokenizer=TextTokenizer.from_file(text_path),
        retriever=retriever,
        retrieval_k=k,
        meta=meta,
        ckpt=Path(ckpt),
    )
