"""Retrieval: a faiss gallery index with its id map, search, and PNG result grids."""

from csmcir.retrieval.index import GalleryIndex, Hits

__all__ = ["GalleryIndex", "Hits"]
