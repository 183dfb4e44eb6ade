"""Scene grammar of the synthetic benchmark: objects on a grid, and the edits that change them.

A scene is a tuple of objects sorted by cell, at most one object per cell. Sorting makes the
tuple canonical, so two scenes are the same picture exactly when the tuples are equal: that is
what lets the generator guarantee that a query's target is the only gallery image satisfying it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

# The grid is fixed at 3x3: the texts name its nine cells in words ("top left", "center").
GRID = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "size": SIZES}

# add, remove, change (colour, shape or size of one object), move.
MOD_TYPES: tuple[str, ...] = ("add", "remove", "change", "move")

Cell = tuple[int, int]


class Obj(NamedTuple):
    """One object; the field order (row, col first) makes sorting a scene sort it by cell."""

    row: int
    col: int
    shape: str
    color: str
    size: str

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    @property
    def kind(self) -> tuple[str, str, str]:
        """What a text names without a position: size, colour, shape."""
        return (self.size, self.color, self.shape)


Scene = tuple[Obj, ...]


def make_scene(objects: list[Obj] | tuple[Obj, ...]) -> Scene:
    """The canonical form of a set of objects; refuses two objects in one cell (a bug upstream)."""
    scene = tuple(sorted(objects))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {scene}")
    return scene


def empty_cells(scene: Scene, grid: int) -> list[Cell]:
    taken = {o.cell for o in scene}
    return [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]


def random_object(rng: random.Random, cell: Cell) -> Obj:
    return Obj(cell[0], cell[1], rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES))


def random_scene(rng: random.Random, grid: int, n_objects: int) -> Scene:
    all_cells = [(r, c) for r in range(grid) for c in range(grid)]
    return make_scene([random_object(rng, cell) for cell in rng.sample(all_cells, n_objects)])


def replace(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    """``scene`` with ``old`` replaced by ``new`` (or removed when ``new`` is None)."""
    rest = [o for o in scene if o != old]
    return make_scene(rest if new is None else [*rest, new])


@dataclass(frozen=True)
class Modification:
    """A structured edit of a reference scene, the ground truth behind one query text.

    ``obj`` is the object acted on as it is in the reference; for ``add`` it is the new object,
    its cell included. ``attribute``/``value`` are set for ``change``, ``dest`` for ``move``.
    """

    kind: str
    obj: Obj
    attribute: str | None = None
    value: str | None = None
    dest: Cell | None = None

    def apply(self, scene: Scene) -> Scene:
        if self.kind == "add":
            return make_scene([*scene, self.obj])
        return replace(scene, self.obj, self.result_object())

    def result_object(self) -> Obj | None:
        """The acted-on object as it is after the edit; None once removed."""
        if self.kind == "add":
            return self.obj
        if self.kind == "change":
            return self.obj._replace(**{self.attribute: self.value})
        if self.kind == "move":
            return self.obj._replace(row=self.dest[0], col=self.dest[1])
        if self.kind == "remove":
            return None
        raise ValueError(f"unknown modification type {self.kind!r}")


def object_count_range(kinds: list[str], min_objects: int, max_objects: int) -> tuple[int, int]:
    """Reference object counts for which every type in ``kinds`` is possible."""
    lo = min_objects + 1 if "remove" in kinds else min_objects
    hi = max_objects - 1 if "add" in kinds else max_objects
    return lo, hi


def random_modification(rng: random.Random, scene: Scene, kind: str, grid: int) -> Modification:
    """A random modification of type ``kind``; the caller checks that ``kind`` is possible."""
    if kind == "add":
        return Modification("add", random_object(rng, rng.choice(empty_cells(scene, grid))))
    obj = rng.choice(scene)
    if kind == "remove":
        return Modification("remove", obj)
    if kind == "change":
        attribute = rng.choice(tuple(ATTRIBUTES))
        value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(obj, attribute)])
        return Modification("change", obj, attribute=attribute, value=value)
    if kind == "move":
        return Modification("move", obj, dest=rng.choice(empty_cells(scene, grid)))
    raise ValueError(f"unknown modification type {kind!r}")


def single_edits(scene: Scene, grid: int, obj: Obj) -> list[Scene]:
    """Every scene that differs from ``scene`` in one attribute or the position of ``obj``."""
    out = []
    for attribute, values in ATTRIBUTES.items():
        out += [replace(scene, obj, obj._replace(**{attribute: v})) for v in values]
    out += [replace(scene, obj, obj._replace(row=r, col=c)) for r, c in empty_cells(scene, grid)]
    return [s for s in out if s != scene]


def one_attribute_neighbours(scene: Scene, grid: int) -> list[Scene]:
    """Every scene one attribute (colour, shape, size or position of one object) away."""
    return [s for obj in scene for s in single_edits(scene, grid, obj)]


def random_near_duplicate(
    rng: random.Random, scene: Scene, grid: int, focus: Obj | None = None
) -> Scene:
    """``scene`` with one attribute (colour, shape, size or position) of one object changed.

    With ``focus`` (the object a query acted on, as it is in ``scene``) that object is edited half
    of the time, so distractors test both reading the text and preserving the rest of the image.
    The attribute is drawn first, uniformly, so colour edits (7 values) do not dominate.
    """
    obj = focus if focus is not None and rng.random() < 0.5 else rng.choice(scene)
    free = empty_cells(scene, grid)
    attribute = rng.choice([*ATTRIBUTES, "position"] if free else list(ATTRIBUTES))
    if attribute == "position":
        row, col = rng.choice(free)
        return replace(scene, obj, obj._replace(row=row, col=col))
    value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(obj, attribute)])
    return replace(scene, obj, obj._replace(**{attribute: value}))
