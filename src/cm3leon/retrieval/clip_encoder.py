"""The frozen CLIP bi-encoder of retrieval (PAPER.md section 4), on open_clip.

    enc = DocumentEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")        # a tag (downloads once)
    enc = DocumentEncoder("ViT-B-32", pretrained="/weights/vit_b_32.pt")     # or a local file
    enc = DocumentEncoder(TINY_CLIP, pretrained="data/shipped/world_clip.pt")  # the embedded world's
    t = enc.encode_texts(captions)          # float32 [N, dim], unit norm
    i = enc.encode_images(pil_images)       # float32 [N, dim], unit norm
    d = document_vectors(t, i)              # float32 [N, dim], unit norm

Vectors, one convention for the memory bank and every query:
- text and image embeddings are each L2-normalised (as open_clip's `normalize=True`);
- a document vector is their mean, L2-normalised AGAIN (RA-CM3: "average the two, with L2 norm"),
  so every vector in the bank has norm 1;
- a query is a unit text vector or a unit image vector; relevance = inner product (<= 1). A query's
  relevance to its own document is sqrt((1 + cos(text, image)) / 2).

Batched: on CUDA the model runs in fp16 (open_clip's `precision="fp16"`) on batches of
`GPU_BATCH` (1024) items, inputs copied from pinned memory; on the CPU in fp32 on batches of
`CPU_BATCH` (256); outputs are normalised in fp32 either way. A random-initialised model is
refused: retrieval needs trained weights.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cm3leon.retrieval.tiny_clip import TINY_CLIP, register_tiny_clip
from cm3leon.safe_load import refusal
from cm3leon.tokenizers.image_processing import ImageLike, to_pil, to_rgb

# the shipped world CLIP, relative to the working directory (the checkout, where `make` runs); the
# configs pass absolute paths (${paths.shipped_dir})
SHIPPED_WORLD_CLIP = "data/shipped/world_clip.pt"
GPU_BATCH = 1024  # items per forward pass on CUDA (fp16 ViT-B-32: ~1 GB of activations)
CPU_BATCH = 256
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def document_vectors(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Unit text [N, D] + unit image [N, D] -> unit document vectors float32 [N, D]."""
    d = np.asarray(text, dtype=np.float32) + np.asarray(image, dtype=np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)


def drop_tokens(
    tokens: torch.Tensor, rate: float, rng: np.random.Generator, special_ids: set[int], pad_id: int = 0
) -> torch.Tensor:
    """Query dropout (PAPER.md section 4): drop round(rate * n) of each row's n content tokens
    (ids not in `special_ids`; at least one is kept) and close the gaps, so the sequence stays
    `<start> kept... <end> <pad>...`. tokens: int [B, C] from the open_clip tokenizer."""
    out = torch.full_like(tokens, pad_id)
    special = torch.tensor(sorted(special_ids | {pad_id}), dtype=tokens.dtype)
    for b, row in enumerate(tokens):
        content = torch.nonzero(~torch.isin(row, special)).flatten().numpy()
        n_drop = min(round(rate * len(content)), max(0, len(content) - 1))
        dropped = rng.choice(content, n_drop, replace=False) if n_drop else np.zeros(0, np.int64)
        keep = np.ones(len(row), bool)
        keep[dropped] = False
        kept = row[torch.from_numpy(keep)]
        out[b, : len(kept)] = kept
    return out


def missing_weights_hint(path: str) -> str:
    """What builds a missing weights file (the shipped world CLIP has a project command)."""
    if Path(path).name == Path(SHIPPED_WORLD_CLIP).name:
        return "train it with `python src/train_clip.py`"
    return "pass an open_clip pretrained tag or an existing weights file"


def check_pretrained(model_name: str, pretrained: str | None) -> None:
    """Fail with one line unless `pretrained` is an existing file or a known open_clip tag."""
    import open_clip

    if not pretrained:
        raise ValueError(
            f"DocumentEncoder({model_name!r}) needs trained weights: set pretrained to an open_clip tag "
            f"({open_clip.list_pretrained_tags_by_model(model_name) or 'none known'}) or a local file"
        )
    if Path(pretrained).is_file():
        return
    if open_clip.get_pretrained_cfg(model_name, pretrained):
        return  # a tag: open_clip downloads it (on a machine with network access)
    if "/" in pretrained or Path(pretrained).suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"CLIP weights {pretrained} not found: {missing_weights_hint(pretrained)}")
    raise ValueError(
        f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name}; "
        f"tags: {open_clip.list_pretrained_tags_by_model(model_name)}"
    )


class DocumentEncoder:
    """open_clip model + its tokenizer and eval transform -> unit text / image / document vectors.

    Args:
        model_name: an open_clip model name ('ViT-B-32', or `TINY_CLIP` for the embedded world).
        pretrained: an open_clip tag or a local weights file (required).
        device: 'cpu', 'cuda', ...; default cuda when available.
        batch_size: items per forward pass; default GPU_BATCH (1024) on CUDA, CPU_BATCH (256) elsewhere.
        precision: open_clip precision; default 'fp16' on CUDA, 'fp32' elsewhere.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        precision: str | None = None,
    ):
        import open_clip

        if model_name == TINY_CLIP:
            register_tiny_clip()
        pretrained = str(pretrained) if pretrained else None
        check_pretrained(model_name, pretrained)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_cuda = self.device.type == "cuda"
        self.precision = precision or ("fp16" if on_cuda else "fp32")
        self.batch_size = int(batch_size or (GPU_BATCH if on_cuda else CPU_BATCH))
        self.model_name, self.pretrained = model_name, pretrained
        try:
            # weights_only: a weights file (local or downloaded) never runs code when it is read
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device, precision=self.precision, weights_only=True
            )
        except pickle.UnpicklingError as e:
            raise refusal(pretrained, "CLIP weights", e) from None
        self.model.eval().requires_grad_(False)
        # images go in at the precision's dtype: with "fp16" open_clip halves the convolution and
        # linear weights but keeps other parameters (embeddings, norms) in fp32
        self.input_dtype = open_clip.get_input_dtype(self.precision) or torch.float32
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.dim = int(self.model.visual.output_dim)

    def special_ids(self) -> tuple[set[int], int]:
        """(ids query dropout never drops: the tokenizer's specials, pad id)."""
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # HFTokenizer wraps a HF tokenizer
        return set(getattr(tok, "all_special_ids", []) or []), int(getattr(tok, "pad_token_id", None) or 0)

    @torch.inference_mode()
    def encode_texts(
        self, texts: Sequence[str], drop_rate: float = 0.0, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Captions -> float32 [N, dim], unit norm. `drop_rate` > 0: query dropout (`drop_tokens`)."""
        out = [np.zeros((0, self.dim), np.float32)]
        special, pad_id = self.special_ids()
        for s in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[s : s + self.batch_size]))
            if drop_rate > 0:
                tokens = drop_tokens(tokens, drop_rate, rng or np.random.default_rng(), special, pad_id)
            out.append(_normalize(self.model.encode_text(self._to_device(tokens))).cpu().numpy())
        return np.concatenate(out)

    def _to_device(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A CPU batch on the model's device (pinned and copied asynchronously on CUDA)."""
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, dtype, non_blocking=True)
        return x.to(self.device, dtype)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """PIL images or uint8 HWC arrays (RGBA blended on white) -> float32 [N, dim], unit norm."""
        out = [np.zeros((0, self.dim), np.float32)]
        for s in range(0, len(images), self.batch_size):
            batch = [self.preprocess(to_rgb(to_pil(im))) for im in images[s : s + self.batch_size]]
            x = self._to_device(torch.stack(batch), self.input_dtype)
            out.append(_normalize(self.model.encode_image(x)).cpu().numpy())
        return np.concatenate(out)

    def encode_documents(
        self, texts: Sequence[str], images: Sequence[ImageLike]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document, text, image) vectors, each float32 [N, dim] with unit norm."""
        if len(texts) != len(images):
            raise ValueError(f"encode_documents: {len(texts)} texts but {len(images)} images")
        t, i = self.encode_texts(texts), self.encode_images(images)
        return document_vectors(t, i), t, i

    def pair_cosines(
        self, images: Sequence[ImageLike], texts: Sequence[str], who: str = "pair_cosines", noun: str = "texts"
    ) -> np.ndarray:
        """images and one text each -> float32 [N] image-text cosine similarities (CLIP score,
        re-ranking). Each distinct text is encoded once; `who` and `noun` word the error."""
        if len(images) != len(texts):
            raise ValueError(f"{who}: {len(images)} images but {len(texts)} {noun}")
        if not len(images):
            return np.zeros(0, np.float32)
        unique = list(dict.fromkeys(texts))
        t = self.encode_texts(unique)  # [U, D]
        rows = np.array([unique.index(s) for s in texts])
        return (self.encode_images(list(images)) * t[rows]).sum(-1).astype(np.float32)

    def describe(self) -> dict:
        """What made the vectors (recorded beside the memory bank, checked by every query side)."""
        from cm3leon.utils import file_sha256

        sha = file_sha256(self.pretrained) if Path(self.pretrained).is_file() else None
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "pretrained_sha256": sha,
            "dim": self.dim,
            "doc_vector": "normalize(normalize(text) + normalize(image))",
        }


def recall_at_k(queries: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Share of rows i whose target i is among the k highest `queries[i] @ targets.T` (float32 [N, D] each)."""
    sim = torch.from_numpy(np.asarray(queries, np.float32)) @ torch.from_numpy(np.asarray(targets, np.float32)).T
    own = sim.diagonal().unsqueeze(1)
    rank = (sim > own).sum(1)  # targets strictly better than the right one (ties count for it)
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}
