"""Benchmark protocols on hand-made splits whose metrics are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.evaluation.protocols import Options, apply_options, compute, prepare


def circo_split() -> CIRSplit:
    """8 gallery images; query 0: reference g0, ground truths g2 (main) and g3; query 1:
    reference g1, ground truth g7 alone."""
    gallery = [f"{i}" for i in range(8)]
    queries = [
        CIRQuery("0", "0", ("is red",), targets=("2", "3")),
        CIRQuery("1", "1", ("is blue",), targets=("7",)),
    ]
    paths = {g: Path(f"{g}.jpg") for g in gallery}
    return CIRSplit("circo", "val", queries, gallery, paths, exclude_reference=False)


# Each query's own reference scores highest, as a model that copies the reference does.
SCORES = torch.tensor(
    [
        [1.0, 0.1, 0.9, 0.7, 0.8, 0.2, 0.3, 0.0],  # ranking 0, 2, 4, 3, 6, 5, 1, 7
        [0.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.2, 0.5],  # ranking 1, 2, 3, 4, 5, 7, 6, 0
    ]
)


def test_circo_ranks_the_reference_by_default_as_the_official_code():
    split = circo_split()
    record = apply_options(split, Options())
    assert record["exclude_reference"] is False
    assert record["reference"] == "ranked with the gallery (circo's protocol)"
    m = compute(SCORES, prepare(split))
    # query 0: ground truths at ranks 2 and 4: AP@5 = (1/2 + 2/4) / 2 = 1/2
    # query 1: its one ground truth at rank 6: AP@5 = 0, AP@10 = (1/6) / 1
    assert m["mAP@5"] == pytest.approx(100 * (0.5 + 0) / 2)
    assert m["mAP@10"] == pytest.approx(100 * (0.5 + 1 / 6) / 2)
    # recall on the main target (g2 at rank 2; g7 at rank 6), at the server's cut-offs
    assert list(m) == [
        "mAP@5",
        "mAP@10",
        "mAP@25",
        "mAP@50",
        "R@5",
        "R@10",
        "R@25",
        "R@50",
    ]
    assert (m["R@5"], m["R@10"], m["R@25"], m["R@50"]) == (50.0, 100.0, 100.0, 100.0)


def test_removing_the_reference_is_an_option_named_in_the_protocol():
    split = circo_split()
    record = apply_options(split, Options(exclude_reference=True))
    assert record["exclude_reference"] is True
    assert record["reference"] == (
        "removed from its ranking by --exclude-reference yes (not circo's protocol, which ranks it)"
    )
    m = compute(SCORES, prepare(split))
    # query 0: ground truths at ranks 1 and 3: AP@5 = (1 + 2/3) / 2 = 5/6
    # query 1: at rank 5: AP@5 = 1/5
    assert m["mAP@5"] == pytest.approx(100 * (5 / 6 + 1 / 5) / 2)
    assert m["R@5"] == 100.0


def test_cirr_keeping_the_reference_is_named_too():
    split = CIRSplit("cirr", "val", [], [], {}, exclude_reference=True)
    assert (
        apply_options(split, Options())["reference"] == "removed from its ranking (cirr's protocol)"
    )
    kept = apply_options(split, Options(exclude_reference=False))["reference"]
    assert kept == (
        "ranked with the gallery by --exclude-reference no (not cirr's protocol, which removes it)"
    )
