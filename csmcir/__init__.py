"""CSMCIR: composed image retrieval with MCoT captions, one shared Q-Former and a memory bank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CSMCIR", "GalleryIndex", "__version__"]

if TYPE_CHECKING:
    from csmcir.model import CSMCIR
    from csmcir.retrieval.index import GalleryIndex


def __getattr__(name: str) -> Any:
    """Import the model and the index on first use, so ``csmcir data ...`` stays torch-free."""
    if name == "CSMCIR":
        from csmcir.model import CSMCIR

        return CSMCIR
    if name == "GalleryIndex":
        from csmcir.retrieval.index import GalleryIndex

        return GalleryIndex
    raise AttributeError(f"module 'csmcir' has no attribute {name!r}")
