"""Retrieval augmentation (PAPER.md section 4): a frozen CLIP bi-encoder on open_clip, a FAISS
memory bank over the training set, RA-CM3 neighbour selection, and the neighbour source / Retriever
that put retrieved documents before a query at training and generation time.

    clip_encoder.py  DocumentEncoder: unit text / image / document vectors (open_clip)
    tiny_clip.py     the embedded world's tiny open_clip model (registered by name), world_clip.pt
    index.py         FAISS index build/load (flat, IVF, IVF-PQ, HNSW; sharded; memory-mapped), KeyMap
    token_store.py   bank row/key -> (text ids, image codes), memory-mapped
    neighbours.py    the selection rule, the offline build (`src/build_index.py`), NeighbourPool (training)
    retriever.py     Retriever: prompt text -> documents, for generation and evaluation
    protocol.py      the one retrieval protocol: documents(queries, k, rng) -> list[list[Document]]

open_clip is imported only where a model is built (it takes seconds to import).
"""

# Names resolve on first use (PEP 562), so that `cm3leon.retrieval.protocol` imports nothing heavy.
_EXPORTS = {
    "DocumentEncoder": "cm3leon.retrieval.clip_encoder",
    "document_vectors": "cm3leon.retrieval.clip_encoder",
    "NeighbourPool": "cm3leon.retrieval.neighbours",
    "ensure_retrieval": "cm3leon.retrieval.neighbours",
    "build_retrieval": "cm3leon.retrieval.neighbours",
    "select_neighbours": "cm3leon.retrieval.neighbours",
    "DocumentSource": "cm3leon.retrieval.protocol",
    "RetrievalQuery": "cm3leon.retrieval.protocol",
    "Retrieved": "cm3leon.retrieval.retriever",
    "Retriever": "cm3leon.retrieval.retriever",
    "TokenStore": "cm3leon.retrieval.token_store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cm3leon.retrieval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
