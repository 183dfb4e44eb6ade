"""``csmcir demo``: a browser page for composed retrieval over a gallery index (Gradio).

Gradio is imported only when the demo runs (see :mod:`csmcir.demo.cli`).
"""

from csmcir.demo.cli import main

__all__ = ["main"]
