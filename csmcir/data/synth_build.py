"""Building the splits of the synthetic benchmark in memory: groups of look-alike scenes.

A group is one reference scene, its targets (one per modification), near-duplicate distractors
of each target, and near-duplicates of the reference that fill the CIRR subset to six. Every scene
is unique across all splits, which is what makes each query's target the only gallery image that
satisfies it and keeps the splits disjoint.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from csmcir.data.synth_scenes import (
    GRID,
    MOD_TYPES,
    Modification,
    Scene,
    object_count_range,
    one_attribute_neighbours,
    random_modification,
    random_near_duplicate,
    random_scene,
)
from csmcir.data.synth_text import modification_text
from csmcir.errors import ConfigError

SPLITS = ("train", "val", "test")
# Test first, so the test split depends on the seed and --test-refs alone, not on the train size.
GENERATION_ORDER = ("test", "val", "train")
SUBSET_SIZE = 6
# Consecutive failures to find a new scene before the scene space counts as exhausted.
MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and scene ranges of one generated benchmark; every field is a command-line flag."""

    seed: int = 0
    train_refs: int = 6000
    val_refs: int = 168
    test_refs: int = 384
    mods_per_ref: int = 2
    distractors_per_query: int = 1
    min_objects: int = 2
    max_objects: int = 5
    image_size: int = 64

    def refs(self, split: str) -> int:
        return {"train": self.train_refs, "val": self.val_refs, "test": self.test_refs}[split]

    def validate(self) -> None:
        """Raise a ConfigError naming the flag of the first impossible setting."""
        for split in SPLITS:
            if self.refs(split) < 1:
                raise ConfigError(f"--{split}-refs must be at least 1 (got {self.refs(split)})")
        if not 1 <= self.mods_per_ref <= len(MOD_TYPES):
            raise ConfigError(
                f"--mods-per-ref must be between 1 and {len(MOD_TYPES)}, one per modification "
                f"type (got {self.mods_per_ref})"
            )
        if self.distractors_per_query < 0:
            raise ConfigError(
                f"--distractors-per-query must be 0 or more (got {self.distractors_per_query})"
            )
        if self.min_objects < 1:
            raise ConfigError(f"--min-objects must be at least 1 (got {self.min_objects})")
        if self.max_objects > GRID * GRID - 1:
            raise ConfigError(
                f"--max-objects must be at most {GRID * GRID - 1}, leaving a free cell to move "
                f"an object to (got {self.max_objects})"
            )
        if self.max_objects < self.min_objects + 2:
            raise ConfigError(
                f"--max-objects ({self.max_objects}) must be at least --min-objects + 2 "
                f"({self.min_objects + 2}), so one reference can take both an add and a remove"
            )
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size must be between 16 and 1024 (got {self.image_size})")


@dataclass
class Query:
    modification: Modification
    text: str
    target: Scene


@dataclass
class Group:
    """A reference, its queries and look-alikes; ``members`` is the CIRR ``img_set``."""

    reference: Scene
    queries: list[Query]
    distractors: list[Scene]
    extras: list[Scene]
    members: list[Scene] = field(default_factory=list)

    def scenes(self) -> list[Scene]:
        return [self.reference, *(q.target for q in self.queries), *self.distractors, *self.extras]


@dataclass
class SplitData:
    name: str
    groups: list[Group]
    names: dict[Scene, str]

    def queries(self) -> list[tuple[Group, Query]]:
        return [(g, q) for g in self.groups for q in g.queries]

    def stats(self) -> dict[str, float | int | dict[str, int]]:
        """Sizes, modification shares and near-duplicate counts, for the summary and the docs."""
        pairs = self.queries()
        types = Counter(q.modification.kind for _, q in pairs)
        changes = Counter(q.modification.attribute for _, q in pairs if q.modification.attribute)
        neighbours = [
            sum(
                s in self.names and s != g.reference
                for s in one_attribute_neighbours(q.target, GRID)
            )
            for g, q in pairs
        ]
        return {
            "references": len(self.groups),
            "queries": len(pairs),
            "images": len(self.names),
            "types": {k: types[k] for k in MOD_TYPES},
            "changes": dict(sorted(changes.items())),
            "mean_objects": sum(map(len, self.names)) / len(self.names),
            "near_duplicates_per_target": sum(neighbours) / len(neighbours),
            "targets_with_near_duplicate": sum(n > 0 for n in neighbours) / len(neighbours),
        }


def _exhausted(what: str) -> ConfigError:
    return ConfigError(
        f"could not find a new {what} scene in {MAX_ATTEMPTS} draws: the scene space is exhausted; "
        "lower --train-refs/--val-refs/--test-refs or widen --min-objects/--max-objects"
    )


def _fresh(draw: Callable[[], Scene], taken: set[Scene], what: str) -> Scene:
    """Draw scenes until one is new, and reserve it."""
    for _ in range(MAX_ATTEMPTS):
        scene = draw()
        if scene not in taken:
            taken.add(scene)
            return scene
    raise _exhausted(what)


def _fresh_modification(
    rng: random.Random, reference: Scene, kind: str, taken: set[Scene]
) -> tuple[Modification, Scene]:
    """A modification of ``reference`` whose result is a new scene, which it reserves."""
    for _ in range(MAX_ATTEMPTS):
        mod = random_modification(rng, reference, kind, GRID)
        target = mod.apply(reference)
        if target not in taken:
            taken.add(target)
            return mod, target
    raise _exhausted("target")


def _modification_kinds(rng: random.Random, config: SynthConfig) -> list[str]:
    """Distinct types for one reference; every type is equally likely overall."""
    return rng.sample(MOD_TYPES, config.mods_per_ref)


def build_group(rng: random.Random, config: SynthConfig, taken: set[Scene]) -> Group:
    """One reference with its queries, distractors and subset; reserves its scenes in ``taken``."""
    kinds = _modification_kinds(rng, config)
    lo, hi = object_count_range(kinds, config.min_objects, config.max_objects)
    reference = _fresh(lambda: random_scene(rng, GRID, rng.randint(lo, hi)), taken, "reference")
    queries, distractors = [], []
    for kind in kinds:
        mod, target = _fresh_modification(rng, reference, kind, taken)
        queries.append(Query(mod, modification_text(rng, reference, mod), target))
        near = partial(random_near_duplicate, rng, target, GRID, mod.result_object())
        distractors.append(
            [_fresh(near, taken, "distractor") for _ in range(config.distractors_per_query)]
        )
    # Round-robin, so a subset cut at six holds a distractor of every target first.
    ordered = [d for round_ in zip(*distractors, strict=True) for d in round_]
    n_extras = max(0, SUBSET_SIZE - 1 - len(queries) - len(ordered))
    near = partial(random_near_duplicate, rng, reference, GRID)
    extras = [_fresh(near, taken, "near-duplicate") for _ in range(n_extras)]
    group = Group(reference, queries, ordered, extras)
    members = group.scenes()[:SUBSET_SIZE]
    rng.shuffle(members)
    group.members = members
    return group


def build_split(name: str, config: SynthConfig, taken: set[Scene]) -> SplitData:
    """All groups of one split, with opaque image names (no role or group in the name)."""
    rng = random.Random(f"synthcir-{config.seed}-{name}")
    groups = [build_group(rng, config, taken) for _ in range(config.refs(name))]
    scenes = [s for g in groups for s in g.scenes()]
    order = list(range(len(scenes)))
    rng.shuffle(order)
    width = max(5, len(str(len(scenes) - 1)))
    names = {scene: f"{name}-{i:0{width}d}" for scene, i in zip(scenes, order, strict=True)}
    return SplitData(name, groups, names)


def build_splits(config: SynthConfig) -> dict[str, SplitData]:
    """Every split, in generation order; scenes are unique across all of them."""
    taken: set[Scene] = set()
    return {name: build_split(name, config, taken) for name in GENERATION_ORDER}
