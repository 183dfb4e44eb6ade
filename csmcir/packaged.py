"""Files that ship inside the package: the fit and ablation configs (``csmcir/configs/``) and the
small pretrained models (``csmcir/pretrained/``).

They are read through :mod:`importlib.resources`, so a wheel install (``pip install csmcir``,
``pip install .``) finds them as a source checkout does, from any working directory. A config is
named by a path to a YAML file, or by its packaged name: its path under ``csmcir/configs/``
without ``.yaml`` (``synthcir``, ``cirr``, ``ablation/synthcir``), as open_clip names its model
configs. A shipped model is named by its folder's name (``synthcir-tiny-stage1``) wherever a
model folder or hub name is taken.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from csmcir.errors import ConfigError

CONFIGS = "configs"
PRETRAINED = "pretrained"
SUFFIX = ".yaml"

# Where a packaged file is not on disk already (a zipped install), as_file extracts it to a
# temporary file that lives as long as the process.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _configs_root() -> Traversable:
    return files("csmcir") / CONFIGS


def config_names() -> list[str]:
    """Every packaged config's name, sorted: ``cirr``, ..., ``ablation/cirr``, ..."""
    names: list[str] = []
    todo: list[tuple[Traversable, tuple[str, ...]]] = [(_configs_root(), ())]
    while todo:
        folder, parts = todo.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                todo.append((entry, (*parts, entry.name)))
            elif entry.name.endswith(SUFFIX):
                names.append("/".join((*parts, entry.name.removesuffix(SUFFIX))))
    return sorted(names, key=lambda name: (name.count("/"), name))


def packaged_config(name: str) -> Path | None:
    """The file of the packaged config ``name`` (``.yaml`` optional), or None when none has it."""
    parts = PurePosixPath(name.removesuffix(SUFFIX)).parts
    if not parts or any(part in ("", ".", "..", "/") for part in parts):
        return None
    entry = _configs_root().joinpath(*parts[:-1], parts[-1] + SUFFIX)
    if not entry.is_file():
        return None
    return _extracted.enter_context(as_file(entry))


def config_file(given: str | Path, flag: str = "--config") -> Path:
    """``given`` when it is a file, else the packaged config of that name; a ConfigError naming
    ``flag`` and the packaged names when it is neither."""
    path = Path(given)
    if path.is_file():
        return path
    packaged = packaged_config(str(given))
    if packaged is not None:
        return packaged
    raise ConfigError(
        f"{flag} {given}: no such file, and no packaged config of that name (packaged: "
        f"{', '.join(config_names())}; a file path works too)"
    )


def pretrained_names() -> list[str]:
    """The shipped models' names, sorted."""
    root = files("csmcir") / PRETRAINED
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def packaged_model(name: str) -> Path | None:
    """The folder of the shipped model ``name``, or None when none has it. Models are folders,
    so they are read where the package lies on disk (every pip install; not a zip import)."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return None
    entry = files("csmcir") / PRETRAINED / name
    return entry if isinstance(entry, Path) and entry.is_dir() else None
