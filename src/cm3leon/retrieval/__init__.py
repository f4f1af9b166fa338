"""Retrieval augmentation (PAPER.md section 4): a frozen CLIP bi-encoder on open_clip, a FAISS
memory bank over the training set, RA-CM3 neighbour selection, and the neighbour source / Retriever
that put retrieved documents before a query at training and generation time.

    clip_encoder.py  DocumentEncoder: unit text / image / document vectors (open_clip)
    tiny_clip.py     the embedded world's tiny open_clip model (registered by name), world_clip.pt
    index.py         FAISS index build/load (flat, IVF, IVF-PQ, HNSW; sharded; memory-mapped), KeyMap
    token_store.py   bank row/key -> (text ids, image codes), memory-mapped
    neighbours.py    the selection rule, the offline build (`src/build_index.py`), build_neighbour_source
    retriever.py     Retriever: prompt text -> documents, for generation and evaluation

open_clip is imported only where a model is built (it takes seconds to import).
"""

from cm3leon.retrieval.clip_encoder import DocumentEncoder, document_vectors
from cm3leon.retrieval.neighbours import build_neighbour_source, build_retrieval, select_neighbours
from cm3leon.retrieval.retriever import Retrieved, Retriever
from cm3leon.retrieval.token_store import TokenStore

__all__ = [
    "DocumentEncoder",
    "Retrieved",
    "Retriever",
    "TokenStore",
    "build_neighbour_source",
    "build_retrieval",
    "document_vectors",
    "select_neighbours",
]
