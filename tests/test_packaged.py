"""The configs ship inside the package and are found by name from any folder, as a wheel install
needs (the wheel itself is built, installed and run outside the checkout by .ci/run)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from csmcir.ablation.config import load_config
from csmcir.cli import main as csmcir_main
from csmcir.errors import ConfigError
from csmcir.hub import MODEL, resolve
from csmcir.packaged import config_file, config_names, packaged_model, pretrained_names
from csmcir.train.cli import with_config_files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "csmcir"


def test_every_file_the_package_reads_is_declared_package_data():
    """A data file under csmcir/ that no package-data pattern matches is left out of the wheel."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["csmcir"]
    data = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert any(name.startswith("configs/ablation/") for name in data)
    left_out = [name for name in data if not any(fnmatch.fnmatch(name, p) for p in patterns)]
    assert left_out == []


def test_config_names_are_the_shipped_yaml_files():
    on_disk = {
        p.relative_to(PACKAGE / "configs").with_suffix("").as_posix()
        for p in (PACKAGE / "configs").rglob("*.yaml")
    }
    assert set(config_names()) == on_disk
    assert {"synthcir", "cirr", "ablation/synthcir"} <= on_disk


def documented_configs() -> list[tuple[str, str, str]]:
    """(file, command, config) for every ``--config X`` of a ``csmcir fit|validate|quickstart|
    features|ablate`` line in the README, docs, docstrings and the configs' own comments, and
    every ``fit_config:`` of a packaged ablation grid (``<placeholders>`` aside)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.yaml"))
    found = []
    for path in files:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text(encoding="utf-8"))
        name = path.relative_to(REPO).as_posix()
        commands = re.findall(r"csmcir (\w+)[^\n`]*?--config[ =]([^\s`\]<][^\s`\]]*)", text)
        found += [(name, verb, value) for verb, value in commands]
        if path.suffix == ".yaml":
            found += [(name, "ablate", v) for v in re.findall(r"fit_config: (\S+)", text)]
    return found


def test_every_documented_config_resolves_from_outside_the_checkout(tmp_path, monkeypatch):
    documented = documented_configs()
    assert len(documented) > 30  # the pattern still finds the docs' commands
    monkeypatch.chdir(tmp_path)
    for where, verb, value in documented:
        path = config_file(value)
        assert path.is_relative_to(PACKAGE / "configs"), (where, value)
        if verb == "ablate" and value.startswith("ablation/"):
            load_config(value)  # and its own fit_config
        else:
            assert "data" in yaml.safe_load(path.read_text(encoding="utf-8")), (where, value)


def test_a_file_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("synthcir").write_text("trainer: {max_steps: 3}\n")
    assert config_file("synthcir") == Path("synthcir")
    assert config_file("synthcir.yaml") == PACKAGE / "configs" / "synthcir.yaml"


@pytest.mark.parametrize(
    "name", ["nope", "configs/synthcir.yaml", "../packaged", "/absent/synthcir"]
)
def test_an_unknown_config_names_the_packaged_ones(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        config_file(name, "--config")
    message = str(refused.value)
    assert message.startswith(f"--config {name}: no such file, and no packaged config")
    assert "synthcir, synthcir_clip4cir, ablation/cirr" in message


def test_fit_reads_packaged_names_in_every_spelling_and_leaves_yaml_text_alone():
    packaged = str(PACKAGE / "configs" / "synthcir.yaml")
    argv = ["fit", "--config", "synthcir", "-c", "cirr", "--config=shoes", "--data.root", "x"]
    assert with_config_files(argv) == [
        "fit",
        "--config",
        packaged,
        "-c",
        str(PACKAGE / "configs" / "cirr.yaml"),
        f"--config={PACKAGE / 'configs' / 'shoes.yaml'}",
        "--data.root",
        "x",
    ]
    text = ["fit", "--config", "trainer: {max_steps: 3}"]
    assert with_config_files(text) == text


def test_fit_refuses_an_unknown_config_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert csmcir_main(["fit", "--config", "synthcirr", "--print_config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csmcir fit: error: --config synthcirr: no such file")
    assert "Traceback" not in err


def test_shipped_models_resolve_by_name_from_any_folder_and_a_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = sorted(p.name for p in (PACKAGE / "pretrained").iterdir() if p.is_dir())
    assert pretrained_names() == shipped and "synthcir-tiny-stage1" in shipped
    for name in shipped:
        assert resolve(name, MODEL, "--model") == PACKAGE / "pretrained" / name
    for name in ("nope", "pretrained/synthcir-tiny-stage1", "..", "", "../configs"):
        assert packaged_model(name) is None
    Path("synthcir-tiny-stage1").mkdir()  # a folder of that name here is the user's own
    assert resolve("synthcir-tiny-stage1", MODEL, "--model") == Path("synthcir-tiny-stage1")
