"""Data layer: one record type for every benchmark, loaders, the synthetic benchmark, checks."""

from csmcir.data.records import CIRQuery, CIRSplit

__all__ = ["CIRQuery", "CIRSplit"]
