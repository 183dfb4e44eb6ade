"""An oracle of the synthetic benchmark: what ``scenes.json`` and a query's text say its answer is.

The oracle reads a modification text with the scene vocabulary alone (the attribute values and
the cell names, not the generator's templates), finds the one reference object the text names,
applies the edit and ranks the gallery by how many objects each image differs from the result.
It marks the top of the range a model's recall lies in: every query has exactly one answer, so a
reader that understands the texts scores 100. ``tests/test_synth.py`` uses the same reader to
check that every text is unambiguous.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from csmcir.data.records import CIRSplit
from csmcir.data.synth_scenes import ATTRIBUTES, Obj, Scene, make_scene
from csmcir.data.synth_text import CELL_NAMES
from csmcir.errors import DataError
from csmcir.io import read_json

SCENES_FILE = "scenes.json"
CELLS = {name: cell for cell, name in CELL_NAMES.items()}
_CELL_RE = re.compile(r"\b(" + "|".join(sorted(CELLS, key=len, reverse=True)) + r")\b")
_OBJECT_RE = re.compile(
    r"\b({}) ({}) ({})\b".format(*("|".join(ATTRIBUTES[a]) for a in ("size", "color", "shape")))
)


def load_scenes(root: str | Path) -> dict[str, Scene]:
    """Every image's scene, by image name, from the benchmark's ``scenes.json``."""
    path = Path(root) / SCENES_FILE
    data = read_json(path, "synthetic scene file")
    fields = ("row", "col", "shape", "color", "size")
    try:
        return {
            name: make_scene([Obj(*(o[f] for f in fields)) for o in entry["objects"]])
            for name, entry in data["images"].items()
        }
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a synthetic scene file ({type(e).__name__}: {e})") from None


def read_modification(text: str, mod_type: str, reference: Scene) -> Scene:
    """The scene ``text`` asks for: the one object it names in ``reference``, edited.

    A DataError when the text names no object, fits several, or does not parse as ``mod_type``.
    """

    def bad(why: str) -> DataError:
        return DataError(f"cannot read {mod_type} text {text!r}: {why}")

    named = _OBJECT_RE.search(text)
    if named is None:
        raise bad("it names no object by size, colour and shape")
    rest = f"{text[: named.start()]} {text[named.end() :]}"
    new_values = [
        (a, v) for a, values in ATTRIBUTES.items() for v in values if re.search(rf"\b{v}\b", rest)
    ]
    cells = [CELLS[c] for c in _CELL_RE.findall(text)]
    taken = {o.cell for o in reference}
    if mod_type == "add":
        if len(cells) != 1 or new_values or cells[0] in taken:
            raise bad("an addition names one free cell and nothing else")
        size, color, shape = named.groups()
        return make_scene([*reference, Obj(*cells[0], shape, color, size)])
    # Where the object is: its cell when the text gives one (a move's last cell is the target).
    where = cells[:1] if mod_type in ("remove", "change") else cells[:-1]
    fits = [o for o in reference if o.kind == named.groups() and (not where or o.cell in where)]
    if len(fits) != 1:
        raise bad(f"it fits {len(fits)} objects of the reference")
    obj = fits[0]
    rest_of_scene = [o for o in reference if o != obj]
    if mod_type == "remove" and len(cells) == 1 and not new_values:
        return make_scene(rest_of_scene)
    if mod_type == "change" and len(new_values) == 1 and len(cells) <= 1:
        attribute, value = new_values[0]
        if getattr(obj, attribute) == value:
            raise bad("it changes nothing")
        return make_scene([*rest_of_scene, obj._replace(**{attribute: value})])
    if mod_type == "move" and len(cells) in (1, 2) and not new_values and cells[-1] not in taken:
        return make_scene([*rest_of_scene, obj._replace(row=cells[-1][0], col=cells[-1][1])])
    raise bad("it does not read as that type of edit")


def oracle_scores(split: CIRSplit, scenes: Mapping[str, Scene]) -> torch.Tensor:
    """``[queries, gallery]`` scores of the oracle: minus the number of objects by which each
    gallery scene differs from the scene the query's text asks for (0 = the answer)."""
    wanted = [
        read_modification(q.texts[0], q.extra["mod_type"], scenes[q.reference])
        for q in split.queries
    ]
    asked, gallery = _one_hot(wanted), _one_hot([scenes[g] for g in split.gallery])
    # |a xor b| = |a| + |b| - 2 |a and b| for sets written as 0/1 rows.
    overlap = asked @ gallery.T
    return 2 * overlap - asked.sum(1, keepdim=True) - gallery.sum(1)[None, :]


def _one_hot(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as 0/1 rows over every (cell, size, colour, shape) an object can have."""
    values = (CELL_NAMES, ATTRIBUTES["size"], ATTRIBUTES["color"], ATTRIBUTES["shape"])
    kinds = {key: i for i, key in enumerate(itertools.product(*values))}
    rows = torch.zeros(len(scenes), len(kinds), dtype=torch.float64)
    for i, scene in enumerate(scenes):
        rows[i, [kinds[(o.cell, *o.kind)] for o in scene]] = 1.0
    return rows
