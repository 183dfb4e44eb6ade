"""The command dispatcher, atomic writes, JSON errors and caption-file reading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from csmcir.cli import main
from csmcir.data.captions import load_captions
from csmcir.errors import DataError
from csmcir.io import atomic_write_json, atomic_write_text, read_json


def test_cli_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in ("data", "caption", "fit", "eval", "quickstart"):
        assert f"  {verb}" in out


def test_cli_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "csmcir", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("csmcir ")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path, '{"a": 2}')
    assert read_json(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_atomic_write_uses_umask_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "x.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert read_json(path) == {"ok": True}
    assert len(list(tmp_path.iterdir())) == 1


def test_read_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(DataError, match=r"broken\.json.*line 2, column 7"):
        read_json(path)
    with pytest.raises(DataError, match="not found"):
        read_json(tmp_path / "absent.json")


def test_load_captions_reads_all_three_forms(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(
        json.dumps(
            {
                "a": {"levels": {"global": "x"}, "Final_Caption": " red cube ", "model": "m"},
                "b": {"Final_Caption": "blue ball"},
                "c": "green cone",
            }
        )
    )
    assert load_captions(path) == {"a": "red cube", "b": "blue ball", "c": "green cone"}


def test_load_captions_refuses_empty(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"a": "ok", "b": "", "c": {"levels": {}}}))
    with pytest.raises(DataError, match=r"2 entries have no usable caption.*b, c"):
        load_captions(path)


def test_top_level_exports_are_lazy():
    code = (
        "import sys, csmcir; assert 'torch' not in sys.modules; "
        "from csmcir import CSMCIR, GalleryIndex; print(CSMCIR.__name__, GalleryIndex.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["CSMCIR", "GalleryIndex"]
