"""Where references, queries and targets land in a model's embedding space: a picture, numbers.

For each sampled query of a benchmark split, three embeddings:

- reference: the target-side encoder on the reference image with EMPTY text (the image alone,
  as the gallery side sees it);
- query: ``encode_query(reference image, modification text)``;
- target: ``encode_target(target image, its caption)``.

A shared tower puts the three in one space; separate towers let the query side drift into a
region of its own. The picture is a 2-D projection (t-SNE by default); the numbers are computed
in the original space, so they do not depend on the projection: the silhouette score of the
three kinds (cosine distance; near 0 = kinds mixed, near 1 = kinds apart), the mean cosine of
matched query-target pairs, of unmatched pairs, and of each query with its own reference.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from csmcir.data.records import CIRSplit
from csmcir.errors import ConfigError, DataError
from csmcir.io import atomic_write
from csmcir.outputs import RECORD_KEY

KINDS = ("reference", "query", "target")
COLOURS = {"reference": "#7f7f7f", "query": "#1f77b4", "target": "#d62728"}
METHODS = ("tsne", "pca", "umap")
PANEL_INCHES, DPI = 5.0, 100


@dataclass
class KindEmbeddings:
    """``[N, D]`` L2-normalised embeddings per kind; row i of each belongs to query i."""

    reference: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows as one ``[3N, D]`` array and their kind labels (0, 1, 2 = KINDS)."""
        parts = [self.reference, self.query, self.target]
        labels = np.repeat(np.arange(len(KINDS)), [len(p) for p in parts])
        return torch.cat(parts).float().numpy(), labels


def sample_queries(split: CIRSplit, count: int, seed: int = 0) -> list:
    """Up to ``count`` queries that have a target, drawn without replacement, in split order."""
    usable = [q for q in split.queries if q.target is not None]
    if not usable:
        raise DataError(f"{split.benchmark}/{split.split} has no query with a known target")
    if count < 2:
        raise ConfigError(f"--queries must be at least 2, got {count}")
    if count >= len(usable):
        return usable
    picked = sorted(random.Random(seed).sample(range(len(usable)), count))
    return [usable[i] for i in picked]


def embed_kinds(
    model,
    split: CIRSplit,
    queries: Sequence,
    captions: Mapping[str, str] | None,
    *,
    empty_captions: bool = False,
    batch_size: int = 64,
) -> KindEmbeddings:
    """The three embeddings of every query (see the module docstring)."""
    from csmcir.evaluation.encode import encode_images, target_texts

    refs = [split.image_path(q.reference) for q in queries]
    targets = [split.image_path(q.target) for q in queries]
    texts = [split.eval_text(q) for q in queries]
    target_captions = target_texts(model, [q.target for q in queries], captions, empty_captions)
    blank = None if target_captions is None else [""] * len(refs)
    kwargs = {"batch_size": batch_size}
    reference = encode_images(model, refs, blank, side="target", desc="references", **kwargs)
    query = encode_images(model, refs, texts, side="query", desc="queries", **kwargs)
    target = encode_images(model, targets, target_captions, side="target", desc="targets", **kwargs)
    return KindEmbeddings(pooled(reference), query, pooled(target))


def pooled(embeddings: torch.Tensor) -> torch.Tensor:
    """One vector per image: image-only targets (``[N, Q, D]``) are averaged over query tokens."""
    if embeddings.dim() == 3:
        embeddings = embeddings.mean(dim=1)
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def separation(emb: KindEmbeddings) -> dict[str, float]:
    """How far apart the kinds are, in the original space (see the module docstring)."""
    from sklearn.metrics import silhouette_score

    x, labels = emb.stacked()
    q, t, r = emb.query.float(), emb.target.float(), emb.reference.float()
    pairs = q @ t.T
    n = len(q)
    unmatched = (pairs.sum() - pairs.diagonal().sum()) / (n * n - n)
    return {
        "silhouette_by_kind": float(silhouette_score(x, labels, metric="cosine")),
        "cos_query_target": float(pairs.diagonal().mean()),
        "cos_query_other_targets": float(unmatched),
        "cos_query_reference": float((q * r).sum(dim=1).mean()),
        "recall_at_1_among_plotted": float((pairs.argmax(dim=1) == torch.arange(n)).float().mean()),
    }


def project(x: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``[M, D]`` -> ``[M, 2]``; t-SNE and UMAP use cosine distance, like the retrieval scores."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(x) - 1) / 3))
        tsne = TSNE(2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
        return tsne.fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError(
                "--method umap needs the umap-learn package (pip install umap-learn); "
                "--method tsne needs nothing extra"
            ) from None
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
    raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")


@dataclass
class Panel:
    """One model's picture: its title, the 2-D points, their kinds and the numbers."""

    title: str
    points: np.ndarray
    labels: np.ndarray
    stats: dict[str, float]


def save_panels(
    panels: Sequence[Panel], path: str | Path, method: str, provenance: dict | None = None
) -> Path:
    """One PNG, one square panel per model side by side: ``500 * len(panels)`` x 560 pixels;
    ``provenance`` (csmcir.outputs) goes into a PNG text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = PANEL_INCHES * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, PANEL_INCHES + 0.6), dpi=DPI)
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        for k, kind in enumerate(KINDS):
            xy = panel.points[panel.labels == k]
            ax.scatter(xy[:, 0], xy[:, 1], s=9, c=COLOURS[kind], alpha=0.7, label=kind, lw=0)
        s = panel.stats
        matched, other = s["cos_query_target"], s["cos_query_other_targets"]
        ax.set_title(
            f"{panel.title}\nsilhouette by kind {s['silhouette_by_kind']:.2f} · "
            f"cos(query, target) {matched:.2f} matched, {other:.2f} other",
            fontsize=10,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8, markerscale=1.5)
    fig.suptitle(f"{method} of reference, query and target embeddings", fontsize=11)
    fig.tight_layout()
    try:
        metadata = {RECORD_KEY: json.dumps(provenance)} if provenance else None
        return atomic_write(
            Path(path), lambda f: fig.savefig(f, format="png", dpi=DPI, metadata=metadata)
        )
    finally:
        plt.close(fig)
