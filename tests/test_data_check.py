"""``csmcir data check``: a complete dataset passes; a missing image, a truncated PNG and a
malformed JSON file each fail with a message naming the file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from csmcir.data import check
from csmcir.errors import ConfigError, DataError


def make_cirr(root: Path) -> Path:
    """A tiny CIRR rc2 copy: val and test1 with captions, train with images only."""
    for split, folder in (("val", "dev"), ("test1", "test1")):
        names = [f"{split}-{i}" for i in range(6)]
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / f"image_splits/split.rc2.{split}.json").write_text(
            json.dumps({n: f"./{folder}/{n}.png" for n in names})
        )
        rec = {"pairid": 1, "reference": names[0], "caption": "c", "img_set": {"id": 1}}
        rec["img_set"]["members"] = names
        if split == "val":
            rec["target_hard"] = names[1]
        (root / "captions").mkdir(exist_ok=True)
        (root / f"captions/cap.rc2.{split}.json").write_text(json.dumps([rec]))
        for n in names:
            (root / folder).mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (10, 200, 10)).save(root / folder / f"{n}.png")
    return root


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_complete_dataset_passes_and_prints_counts(tmp_path: Path, capsys):
    root = make_cirr(tmp_path)
    assert check.run(parse("cirr", "--root", str(root), "--split", "val")) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "split",
        "queries",
        "gallery",
        "images",
        "missing",
        "unreadable",
        "status",
    ]
    assert row.split() == ["cirr/val", "1", "6", "6", "0", "0", "ok"]


def test_all_splits_report_the_absent_train_captions(tmp_path: Path, capsys):
    root = make_cirr(tmp_path)
    with pytest.raises(DataError, match=r"(?s)1 of 3 splits failed.*rc2\.train\.json not found"):
        check.run(parse("cirr", "--root", str(root)))
    out = capsys.readouterr().out
    assert "cirr/train" in out and "cirr/test1" in out


def test_missing_image_fails_naming_it(tmp_path: Path):
    root = make_cirr(tmp_path)
    (root / "dev/val-3.png").unlink()
    with pytest.raises(DataError, match=r"cirr/val: 1 missing: .*dev/val-3\.png"):
        check.run(parse("cirr", "--root", str(root), "--split", "val"))


def test_truncated_png_fails_naming_it_and_no_decode_skips(tmp_path: Path):
    root = make_cirr(tmp_path)
    path = root / "dev/val-2.png"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"1 unreadable: unreadable image .*dev/val-2\.png"):
        check.run(parse("cirr", "--root", str(root), "--split", "val"))
    assert check.run(parse("cirr", "--root", str(root), "--split", "val", "--no-decode")) == 0


def test_malformed_json_fails_naming_file_and_position(tmp_path: Path):
    root = make_cirr(tmp_path)
    (root / "captions/cap.rc2.test1.json").write_text('[{"pairid": 1,,}]')
    with pytest.raises(DataError, match=r"cap\.rc2\.test1\.json: .* line 1, column 15"):
        check.run(parse("cirr", "--root", str(root), "--split", "test1"))


def test_fashioniq_checks_each_category_and_rejects_category_elsewhere(tmp_path: Path, capsys):
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions").mkdir()
    (tmp_path / "images").mkdir()
    for cat in ("dress", "shirt", "toptee"):
        (tmp_path / f"image_splits/split.{cat}.val.json").write_text(json.dumps([f"{cat}1"]))
        rec = {"candidate": f"{cat}1", "target": f"{cat}1", "captions": ["a", "b"]}
        (tmp_path / f"captions/cap.{cat}.val.json").write_text(json.dumps([rec]))
        Image.new("RGB", (4, 4)).save(tmp_path / f"images/{cat}1.jpg")
    assert check.run(parse("fashioniq", "--root", str(tmp_path), "--split", "val")) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert [r.split()[0] for r in rows] == [
        f"fashioniq-{c}/val" for c in ("dress", "shirt", "toptee")
    ]
    with pytest.raises(ConfigError, match="--category applies to fashioniq only"):
        check.run(parse("cirr", "--root", str(tmp_path), "--category", "dress"))


def test_cli_exit_code_and_message(tmp_path: Path, capsys):
    pytest.importorskip("csmcir.data.synth")  # the data verb's other action, imported by its cli
    from csmcir.cli import main

    root = make_cirr(tmp_path)
    assert main(["data", "check", "cirr", "--root", str(root), "--split", "val"]) == 0
    (root / "dev/val-5.png").unlink()
    assert main(["data", "check", "cirr", "--root", str(root), "--split", "val"]) == 2
    assert "dev/val-5.png" in capsys.readouterr().err
