"""Retrieval at inference: prompt text -> documents from the memory bank (PAPER.md section 4: at
generation and FID time, retrieval is by the prompt text only; no query dropout).

    retriever = Retriever("data/world/tokens/retrieval")          # encoder and rules from its manifest
    hits = retriever.retrieve(["a large red circle in the top left on a white background"], k=2)
    hits[0][0].key, hits[0][0].score, hits[0][0].document         # Document(text_ids, codes)
    docs = retriever.documents([RetrievalQuery(text=p) for p in prompts], k=2)   # the protocol

The same selection rule as training (`select_neighbours`): candidates with relevance above
`max_relevance` and duplicates of picked documents are skipped; fewer than k survivors among
`search_k` candidates give fewer documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3leon.data.sequences import Document
from cm3leon.retrieval.index import load_index
from cm3leon.retrieval.neighbours import RetrievalConfig, check_bank_tokenizers, read_manifest, select_neighbours
from cm3leon.retrieval.protocol import RetrievalQuery
from cm3leon.retrieval.token_store import TokenStore


@dataclass
class Retrieved:
    key: str  # the bank sample's key
    row: int  # its bank row (FAISS id)
    score: float  # relevance to the prompt (inner product of unit vectors)
    document: Document


class Retriever:
    """Memory bank (FAISS index + token store) and the encoder that built it.

    Args:
        folder: a retrieval folder written by `python src/build_index.py` (`<tokens>/retrieval`).
        encoder: a DocumentEncoder; default: the manifest's model and weights. Another encoder is
            refused (its vectors would not be comparable with the bank's).
        k, max_relevance, duplicate_threshold, search_k: defaults from the manifest's rules.
        nprobe, ef_search: IVF / HNSW search effort (default: as built).
        tokenizers: {image_tokenizer, text_tokenizer}: sha256 of the tokenizers the caller's model
            reads tokens with; a bank tokenized with others is refused (its image codes would be
            another codebook's). None: not checked.
    """

    def __init__(
        self,
        folder: str | Path,
        encoder=None,
        k: int = 2,
        max_relevance: float | None = None,
        duplicate_threshold: float | None = None,
        search_k: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str | None = None,
        tokenizers: Mapping[str, str] | None = None,
    ):
        from cm3leon.retrieval.clip_encoder import DocumentEncoder

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, self.folder.parent)
        if tokenizers is not None:
            check_bank_tokenizers(self.folder, tokenizers, "the model's tokenizers", self.manifest)
        built = self.manifest["encoder"]
        if encoder is None:
            encoder = DocumentEncoder(built["model_name"], built["pretrained"], device=device)
        made = encoder.describe()
        if (made["model_name"], made["pretrained_sha256"] or made["pretrained"]) != (
            built["model_name"],
            built["pretrained_sha256"] or built["pretrained"],
        ):
            raise ValueError(
                f"Retriever: the encoder {made['model_name']} ({made['pretrained']}) is not the one that embedded "
                f"the bank in {self.folder} ({built['model_name']}, {built['pretrained']}); rebuild the index or pass that encoder"
            )
        self.encoder = encoder
        rules = self.manifest["rules"]
        self.k = k
        self.max_relevance = rules["max_relevance"] if max_relevance is None else max_relevance
        self.duplicate_threshold = rules["duplicate_threshold"] if duplicate_threshold is None else duplicate_threshold
        self.search_k = rules["search_k"] if search_k is None else search_k
        index_cfg = self.manifest["index"]["config"]
        self.index = load_index(
            self.folder / "bank" / "index.faiss",
            nprobe=index_cfg["nprobe"] if nprobe is None else nprobe,
            ef_search=index_cfg["ef_search"] if ef_search is None else ef_search,
        )
        self.bank_docs = np.load(self.folder / "bank" / "doc.npy", mmap_mode="r")
        self.store = TokenStore(self.folder / "store")

    @classmethod
    def from_config(cls, retrieval_cfg, token_dir: str | Path, **kwargs) -> "Retriever":
        """From `conf/retrieval/*.yaml` and the token folder (data.tokens_dir)."""
        cfg = RetrievalConfig.from_any(retrieval_cfg)
        return cls(cfg.folder(token_dir), k=kwargs.pop("k", cfg.k) or 2, **kwargs)

    def retrieve(self, prompts: Sequence[str], k: int | None = None) -> list[list[Retrieved]]:
        """Up to k documents per prompt text, most relevant first, with their keys and scores."""
        if isinstance(prompts, str):
            raise TypeError("Retriever.retrieve takes a list of prompt texts, not one string")
        k = self.k if k is None else k
        if not prompts or k <= 0:
            return [[] for _ in prompts]
        queries = self.encoder.encode_texts(list(prompts))
        scores, rows = self.index.search(queries, max(self.search_k, k))
        rows, scores = select_neighbours(
            [(scores, rows)], self.bank_docs, k, self.max_relevance, self.duplicate_threshold
        )
        out = []
        for r_row, s_row in zip(rows, scores):
            hits = [
                Retrieved(self.store.key(r), int(r), float(s), self.store.document(r))
                for r, s in zip(r_row, s_row)
                if r >= 0
            ]
            out.append(hits)
        return out

    def documents(
        self, queries: Sequence[RetrievalQuery | str], k: int | None = None, rng: np.random.Generator | None = None
    ) -> list[list[Document]]:
        """The retrieval protocol (`cm3leon.retrieval.protocol`): up to k documents per query, by
        its text (queries may also be plain strings). `rng` is unused: inference retrieval is
        deterministic (no query dropout)."""
        texts = []
        for q in queries:
            text = q if isinstance(q, str) else q.text
            if not text:
                raise ValueError(
                    f"Retriever answers queries by their text; got {q!r} (inference retrieves by the prompt)"
                )
            texts.append(text)
        return [[h.document for h in hits] for hits in self.retrieve(texts, k)]
