"""Modification texts of the synthetic benchmark: unambiguous, with a few paraphrases per type.

An object is always named by all three attributes ("the small red square"). Its cell is added
when another object of the reference has the same three attributes, so the text picks out exactly
one object. A removed object is always named with its cell, and half of the remove templates
state how many objects remain: see ``docs/synthcir.md`` for why remove queries need that.
"""

from __future__ import annotations

import random
import re

from csmcir.data.synth_scenes import Cell, Modification, Obj, Scene

CELL_NAMES: dict[Cell, str] = {
    (0, 0): "top left",
    (0, 1): "top middle",
    (0, 2): "top right",
    (1, 0): "middle left",
    (1, 1): "center",
    (1, 2): "middle right",
    (2, 0): "bottom left",
    (2, 1): "bottom middle",
    (2, 2): "bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How often an optional position is given anyway, so its presence does not reveal a duplicate.
OPTIONAL_POSITION_RATE = 0.25

# Placeholders: {new} a new object, {obj} the object acted on (with its cell when given),
# {at} "in the <cell>", {to} "to the <cell>", {value} the new attribute value, {remaining}
# "<number> object(s)" left after a removal.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add a {new} {at}",
        "put a {new} {at}",
        "place a {new} {at}",
        "there should also be a {new} {at}",
    ),
    "remove": (
        "remove the {obj}",
        "take away the {obj}",
        "remove the {obj}, leaving {remaining}",
        "get rid of the {obj}; {remaining} should be left",
    ),
    "color": (
        "make the {obj} {value}",
        "paint the {obj} {value}",
        "change the colour of the {obj} to {value}",
        "the {obj} should be {value}",
    ),
    "shape": (
        "turn the {obj} into a {value}",
        "make the {obj} a {value} instead",
        "change the {obj} into a {value}",
        "the {obj} should be a {value}",
    ),
    "size": (
        "make the {obj} {value}",
        "change the size of the {obj} to {value}",
        "the {obj} should be {value}",
    ),
    "move": (
        "move the {obj} {to}",
        "shift the {obj} {to}",
        "put the {obj} {to} instead",
        "the {obj} should go {to}",
    ),
}


def template_words() -> list[str]:
    """The words modification texts are made of beyond the captions' (verbs, connectives,
    counts, cells): each template without its placeholders. A tokenizer built from these and the
    captions reads every modification text without having seen one (the tiny preset's stage-1
    weights, docs/training.md)."""
    bare = [re.sub(r"\{\w+\}", " ", t) for texts in TEMPLATES.values() for t in texts]
    return [*bare, "in the", "to the", "object objects", *NUMBER_WORDS, *CELL_NAMES.values()]


def object_phrase(obj: Obj) -> str:
    return " ".join(obj.kind)


def needs_position(scene: Scene, obj: Obj) -> bool:
    """True when another object of ``scene`` has the same size, colour and shape as ``obj``."""
    return sum(o.kind == obj.kind for o in scene) > 1


def referring_phrase(rng: random.Random, scene: Scene, obj: Obj, always_position: bool) -> str:
    """Name ``obj`` so that it is the only object of ``scene`` the phrase fits."""
    phrase = object_phrase(obj)
    if always_position or needs_position(scene, obj) or rng.random() < OPTIONAL_POSITION_RATE:
        phrase += f" in the {CELL_NAMES[obj.cell]}"
    return phrase


def count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} object{'' if n == 1 else 's'}"


def modification_text(rng: random.Random, reference: Scene, mod: Modification) -> str:
    """A paraphrase of ``mod`` applied to ``reference``, drawn from the templates of its type."""
    if mod.kind == "add":
        template = rng.choice(TEMPLATES["add"])
        return template.format(new=object_phrase(mod.obj), at=f"in the {CELL_NAMES[mod.obj.cell]}")
    template = rng.choice(TEMPLATES[mod.attribute if mod.kind == "change" else mod.kind])
    obj = referring_phrase(rng, reference, mod.obj, always_position=mod.kind == "remove")
    return template.format(
        obj=obj,
        value=mod.value,
        to=f"to the {CELL_NAMES[mod.dest]}" if mod.dest else "",
        remaining=count_phrase(len(reference) - 1),
    )
