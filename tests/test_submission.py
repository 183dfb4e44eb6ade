"""Submission writers on small hand-made splits: valid files pass, every kind of bad file fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csmcir.data.records import CIRQuery, CIRSplit
from csmcir.errors import DataError
from csmcir.evaluation import submission
from csmcir.evaluation.submission import (
    check_circo_file,
    check_cirr_file,
    write_circo_submission,
    write_cirr_submission,
)

GALLERY = [f"test1-{i}-0-img0" for i in range(60)]


def cirr_split(split: str = "test1") -> CIRSplit:
    queries = [
        CIRQuery(
            query_id=str(100 + i),
            reference=GALLERY[i],
            texts=(f"text {i}",),
            subset=tuple(GALLERY[i : i + 6]),
            extra={"pairid": 100 + i},
        )
        for i in range(4)
    ]
    paths = {g: Path(f"{g}.png") for g in GALLERY}
    return CIRSplit("cirr", split, queries, list(GALLERY), paths, exclude_reference=True)


def cirr_rankings(split: CIRSplit) -> tuple[list[list[str]], list[list[str]]]:
    recall = [[g for g in reversed(GALLERY) if g != q.reference][:50] for q in split.queries]
    subset = [[m for m in q.subset if m != q.reference][:3] for q in split.queries]
    return recall, subset


def test_cirr_files_have_the_server_format(tmp_path):
    split = cirr_split()
    recall, subset = cirr_rankings(split)
    paths = write_cirr_submission(split, recall, subset, tmp_path, name="run1")
    assert [p.name for p in paths] == [
        "recall_submission_run1.json",
        "recall_subset_submission_run1.json",
    ]
    r = json.loads(paths[0].read_text())
    assert r["version"] == "rc2" and r["metric"] == "recall"
    assert sorted(k for k in r if k not in {"version", "metric"}) == ["100", "101", "102", "103"]
    assert r["101"] == recall[1] and len(r["101"]) == 50
    s = json.loads(paths[1].read_text())
    assert s["metric"] == "recall_subset" and s["103"] == subset[3] == GALLERY[4:7]


def test_cirr_refuses_a_split_without_a_server(tmp_path):
    split = cirr_split("val")
    with pytest.raises(DataError, match="scores split 'test1', not 'val'"):
        write_cirr_submission(split, *cirr_rankings(split), tmp_path)
    synth = cirr_split()
    synth.benchmark = "synthcir"
    with pytest.raises(DataError, match="synthcir has no test server"):
        submission.check_submission_split(synth.benchmark, synth.split)


def test_cirr_file_for_another_split_is_named(tmp_path):
    split = cirr_split()
    path = write_cirr_submission(split, *cirr_rankings(split), tmp_path)[0]
    other = cirr_split()
    other.queries = [
        CIRQuery(str(900 + i), q.reference, q.texts, subset=q.subset)
        for i, q in enumerate(other.queries)
    ]
    with pytest.raises(DataError, match=r"4 of its 4 queries missing.*is it for another split"):
        check_cirr_file(path, other, "recall")


def rewrite(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    ("which", "change", "message"),
    [
        (0, lambda o: o.pop("102"), "1 of its 4 queries missing"),
        (0, lambda o: o.update(version="rc1"), "'version' must be 'rc2'"),
        (0, lambda o: o.update(metric="recall_subset"), "'metric' must be 'recall'"),
        (0, lambda o: o["100"].pop(), "expected a list of 50 images, got 49"),
        (0, lambda o: o["100"].__setitem__(1, o["100"][0]), "repeats an image"),
        (0, lambda o: o["100"].__setitem__(0, GALLERY[0]), "lists its own reference"),
        (0, lambda o: o["100"].__setitem__(0, "dev-1-1-img1"), "not a candidate"),
        (1, lambda o: o["100"].__setitem__(0, GALLERY[20]), "not a candidate"),
        (1, lambda o: o.update({"999": ["a", "b", "c"]}), "1 unknown keys"),
    ],
)
def test_cirr_check_catches_bad_files(tmp_path, which, change, message):
    split = cirr_split()
    path = write_cirr_submission(split, *cirr_rankings(split), tmp_path)[which]
    metric = ["recall", "recall_subset"][which]
    check_cirr_file(path, split, metric)
    rewrite(path, change)
    with pytest.raises(DataError, match=message):
        check_cirr_file(path, split, metric)


def test_cirr_check_catches_duplicate_keys_and_size(tmp_path, monkeypatch):
    split = cirr_split()
    path = write_cirr_submission(split, *cirr_rankings(split), tmp_path)[1]
    text = path.read_text()
    path.write_text(text[:-1] + ',"100":["a","b","c"]}')
    with pytest.raises(DataError, match="key '100' appears more than once"):
        check_cirr_file(path, split, "recall_subset")
    monkeypatch.setattr(submission, "CIRR_MAX_BYTES", 1000)
    with pytest.raises(DataError, match="over the CIRR server's 5 MB limit"):
        write_cirr_submission(split, *cirr_rankings(split), tmp_path)


def test_cirr_writer_refuses_a_bad_ranking(tmp_path):
    split = cirr_split()
    recall, subset = cirr_rankings(split)
    recall[2] = recall[2][:10]
    with pytest.raises(DataError, match="query 102: expected a list of 50 images, got 10"):
        write_cirr_submission(split, recall, subset, tmp_path)


def circo_split(split: str = "test") -> CIRSplit:
    gallery = [str(1000 + i) for i in range(70)]
    queries = [CIRQuery(str(i), gallery[i], (f"text {i}",)) for i in range(3)]
    paths = {g: Path(f"{g}.jpg") for g in gallery}
    return CIRSplit("circo", split, queries, gallery, paths, exclude_reference=True)


def test_circo_file_has_fifty_unique_integer_ids(tmp_path):
    split = circo_split()
    top = [[g for g in split.gallery if g != q.reference][:50] for q in split.queries]
    path = write_circo_submission(split, top, tmp_path)
    obj = json.loads(path.read_text())
    assert list(obj) == ["0", "1", "2"]
    assert obj["1"][:3] == [1000, 1002, 1003] and len(set(obj["1"])) == 50
    rewrite(path, lambda o: o["2"].__setitem__(5, str(o["2"][5])))
    with pytest.raises(DataError, match="query 2: expected a list of integer image ids"):
        check_circo_file(path, split)
    with pytest.raises(DataError, match="server scores split 'test', not 'val'"):
        write_circo_submission(circo_split("val"), top, tmp_path)
    top[0][1] = top[0][0]
    with pytest.raises(DataError, match="query 0: the list repeats an image"):
        write_circo_submission(split, top, tmp_path)


def test_circo_submission_may_list_the_reference(tmp_path):
    """CIRCO's own code ranks the whole gallery: the reference can be among the top 50."""
    split = circo_split()
    split.exclude_reference = False
    top = [list(split.gallery[:50]) for _ in split.queries]  # query 0's reference comes first
    assert top[0][0] == split.queries[0].reference
    path = write_circo_submission(split, top, tmp_path)
    check_circo_file(path, split)
    assert json.loads(path.read_text())["0"][0] == int(split.queries[0].reference)


def test_a_refused_submission_never_lands_on_disk(tmp_path, monkeypatch):
    split = circo_split()
    top = [list(split.gallery[:50]) for _ in split.queries]
    top[1][1] = top[1][0]
    with pytest.raises(DataError, match="query 1: the list repeats an image"):
        write_circo_submission(split, top, tmp_path)
    assert list(tmp_path.iterdir()) == []
    # an earlier good file of the same name survives a refused rewrite, byte for byte
    top[1][1] = split.gallery[60]
    good = write_circo_submission(split, top, tmp_path)
    before = good.read_bytes()
    top[2] = top[2][:49]
    with pytest.raises(DataError, match="query 2: expected a list of 50 images, got 49"):
        write_circo_submission(split, top, tmp_path)
    assert good.read_bytes() == before and sorted(tmp_path.iterdir()) == [good]

    cirr = cirr_split()
    recall, subset = cirr_rankings(cirr)
    subset[3] = [cirr.queries[3].reference, *subset[3][:2]]
    out = tmp_path / "cirr"
    with pytest.raises(DataError, match="query 103: lists its own reference"):
        write_cirr_submission(cirr, recall, subset, out)
    assert not out.exists() or list(out.iterdir()) == []  # neither of the two files
    monkeypatch.setattr(submission, "CIRR_MAX_BYTES", 1000)
    with pytest.raises(DataError, match="over the CIRR server's 5 MB limit"):
        write_cirr_submission(cirr, *cirr_rankings(cirr), out)
    assert not out.exists() or list(out.iterdir()) == []
