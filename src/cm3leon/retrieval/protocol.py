"""The one retrieval protocol: how training, generation and evaluation get retrieved documents.

A *document source* answers a batch of queries with, per query, up to k `Document`s (most relevant
first) that are laid out before the query (`cm3leon.data.sequences`):

    source.documents(queries, k, rng=None) -> list[list[Document]]

A `RetrievalQuery` names what is known about the query:
- `text`: the prompt's caption. At generation and FID time retrieval is by the prompt text only
  (PAPER.md section 4); `Retriever` (a FAISS memory bank + the CLIP that built it) answers it.
- `key`: a training sample's key. Training queries were answered offline (`build_index.py`:
  2 documents by image + 2 by text per pair); `NeighbourPool` draws k of that pool with `rng`, the
  example's own generator, so that a resumed data stream yields the same documents.

Both sources are built from the one config group `conf/retrieval/*.yaml` (keys `k`, `dir`):
training with `retrieval=ra` (the DataModule: `NeighbourPool.from_config(cfg, tokens_dir)`),
generation and evaluation with `retrieval=checkpoint` (the default: the k and memory bank the
checkpoint was trained with; `cm3leon.generation.pipeline.open_retriever`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from cm3leon.data.sequences import Document


@dataclass(frozen=True)
class RetrievalQuery:
    """What a document source may use to answer a query (see the module docstring)."""

    text: str | None = None
    key: str | None = None


@runtime_checkable
class DocumentSource(Protocol):
    """Anything that answers retrieval queries with documents."""

    def documents(
        self, queries: Sequence[RetrievalQuery], k: int, rng: np.random.Generator | None = None
    ) -> list[list[Document]]:
        """Up to k documents per query, most relevant first (fewer when the source has fewer)."""
        ...
