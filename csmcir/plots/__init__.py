"""Pictures of a trained model: ``csmcir plot embeddings`` (see :mod:`csmcir.plots.embeddings`)."""
