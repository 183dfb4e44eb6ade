"""CSMCIR: composed image retrieval with MCoT captions, one shared Q-Former and a memory bank."""

__version__ = "0.1.0"
