"""The ``oracle`` backend: multi-level captions written from the synthetic benchmark's scenes.

It stands in for an MLLM on the embedded default, where the true content of every image is known
(``scenes.json``). It answers with the same JSON an MLLM is asked for, and that answer goes
through the same parsing and checks. ``noise`` is the chance that each attribute of each object
(shape, colour, size, position) is misperceived: dropped from the description or replaced by a
wrong value, half of the time each, to mimic MLLM mistakes. The noise depends only on ``seed``
and the image id, so a caption is the same whatever the order, sharding or resumption.

Levels: ``global`` counts the objects and their shapes, ``attributes`` gives each object's size,
colour and shape, ``details`` gives where each object is. The final sentence carries what the
requested levels found: the ``plain`` style (and ``--levels global``) names only the shapes.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from captioning.prompts import FINAL_KEY, PromptSpec
from csmcir.errors import ConfigError, DataError
from csmcir.io import read_json

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
OBJECT_KEYS = ("shape", "color", "size", "row", "col")


@dataclass(frozen=True)
class Seen:
    """One object as the oracle perceives it; None is an attribute it missed."""

    shape: str | None
    color: str | None
    size: str | None
    cell: tuple[int, int] | None


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def count_phrase(n: int, noun: str) -> str:
    if n == 1:
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    number = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{number} {plural(noun)}"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class OracleBackend(Backend):
    name = "oracle"
    batch_size = 256

    def __init__(self, scenes_path: str | Path, noise: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"--noise must be between 0 and 1 (got {noise})")
        self.scenes_path = Path(scenes_path)
        if not self.scenes_path.is_file():
            raise ConfigError(
                f"the oracle backend needs the synthetic benchmark's scenes file, not found: "
                f"{self.scenes_path} (only 'csmcir data synth' output has one)"
            )
        data = read_json(self.scenes_path, "scenes file")
        try:
            self.grid = int(data["grid"])
            self.attributes: dict[str, list[str]] = {
                k: list(data["attributes"][k]) for k in ("shape", "color", "size")
            }
            self.scenes: dict[str, Any] = dict(data["images"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{self.scenes_path}: expected 'grid', 'attributes' (shape/color/size) and "
                f"'images' keys ({type(e).__name__}: {e})"
            ) from None
        self.noise = noise
        self.seed = seed

    @property
    def model(self) -> str:
        return f"oracle(noise={self.noise:g},seed={self.seed})"

    def check(self, spec: PromptSpec, image_ids: Sequence[str]) -> None:
        if spec.domain != "synthetic":
            raise ConfigError(
                f"the oracle backend only describes synthetic scenes (prompt domain "
                f"'synthetic'), not {spec.domain!r}"
            )
        absent = [i for i in image_ids if i not in self.scenes]
        if absent:
            raise DataError(
                f"{self.scenes_path} has no scene for {len(absent)} image(s): "
                f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
            )

    async def generate(self, requests: Sequence[Request]) -> list[Answer | BackendFailure]:
        return [Answer(self.answer(r.image_id, r.spec)) for r in requests]

    def answer(self, image_id: str, spec: PromptSpec) -> str:
        """The JSON answer for one image: the requested levels, then the final sentence."""
        seen = self.perceive(image_id)
        levels = {
            "global": self.global_level(seen),
            "attributes": "; ".join(self.phrase(o, kind=True, where=False) for o in seen) + ".",
            "details": "; ".join(self.phrase(o, kind=True, where=True) for o in seen) + ".",
        }
        out = {level: levels[level] for level in spec.levels}
        out[FINAL_KEY] = self.final(seen, spec)
        return json.dumps(out)

    def perceive(self, image_id: str) -> list[Seen]:
        rng = random.Random(f"{self.seed}/{image_id}")
        seen = []
        for i, obj in enumerate(self.scenes[image_id]["objects"]):
            try:
                shape, color, size, row, col = (obj[k] for k in OBJECT_KEYS)
            except (KeyError, TypeError):
                raise DataError(
                    f"{self.scenes_path}: object {i} of image {image_id!r} needs the keys "
                    f"{', '.join(OBJECT_KEYS)}"
                ) from None
            seen.append(
                Seen(
                    self._noisy(rng, shape, self.attributes["shape"]),
                    self._noisy(rng, color, self.attributes["color"]),
                    self._noisy(rng, size, self.attributes["size"]),
                    self._noisy_cell(rng, (int(row), int(col))),
                )
            )
        return seen

    def _noisy(self, rng: random.Random, value: str, choices: list[str]) -> str | None:
        if rng.random() >= self.noise:
            return value
        others = [c for c in choices if c != value]
        return rng.choice(others) if others and rng.random() < 0.5 else None

    def _noisy_cell(self, rng: random.Random, cell: tuple[int, int]) -> tuple[int, int] | None:
        if rng.random() >= self.noise:
            return cell
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) != cell]
        return rng.choice(cells) if cells and rng.random() < 0.5 else None

    def where(self, cell: tuple[int, int]) -> str:
        """Cell names as the benchmark's texts use them on a 3x3 grid, else row/column numbers."""
        r, c = cell
        if self.grid == 3:
            return "center" if cell == (1, 1) else f"{ROWS[r]} {COLS[c]}"
        return f"row {r + 1} column {c + 1}"

    def global_level(self, seen: list[Seen]) -> str:
        shapes = Counter(o.shape or "object" for o in seen)
        inventory = join_and([count_phrase(n, s) for s, n in shapes.items()])
        total = count_phrase(len(seen), "object") if seen else "no objects"
        return f"{total} on a {self.grid}x{self.grid} grid: {inventory}."

    def phrase(self, o: Seen, kind: bool, where: bool) -> str:
        words = [o.size, o.color] if kind else []
        words = [w for w in words if w] + [o.shape or "object"]
        if where and o.cell is not None:
            words.append(self.where(o.cell))
        return " ".join(words)

    def final(self, seen: list[Seen], spec: PromptSpec) -> str:
        """The final sentence, shortened (no "and", no sizes, fewer objects) to fit the limit."""
        if not seen:
            return "an empty grid"
        if "attributes" not in spec.levels and "details" not in spec.levels:
            shapes = Counter(o.shape or "object" for o in seen)
            candidates = [join_and([count_phrase(n, s) for s, n in shapes.items()])]
        else:
            kind, where = "attributes" in spec.levels, "details" in spec.levels
            parts = [self.phrase(o, kind, where) for o in seen]
            unsized = [self.phrase(Seen(o.shape, o.color, None, o.cell), kind, where) for o in seen]
            candidates = [join_and(parts), ", ".join(parts), ", ".join(unsized)]
            for k in range(len(seen) - 1, 0, -1):
                n = len(seen) - k
                more = f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} more object"
                candidates.append(", ".join(unsized[:k]) + f" and {more}{'s' if n > 1 else ''}")
        for text in candidates:
            if len(text.split()) <= spec.max_words:
                return text
        return count_phrase(len(seen), "object")
