"""Turning an MLLM's answer into checked levels and a ``Final_Caption``, or a reason it failed.

MLLMs wrap JSON in code fences, add prose around it, leave trailing commas, use single quotes,
rename or nest keys, get cut off, answer in another language or loop on one word. Extraction is
lenient about the form; the checks on the final sentence are strict, because a caption stored as
good is used as the target's text in training and retrieval. A failed check raises
:class:`ParseError` with a reason the caption store records.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from captioning.prompts import FINAL_KEY, LEVELS, PromptSpec

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})
_FINAL_ALIASES = {"finalcaption", "final", "caption", "finaldescription", "finalsentence"}
_LEVEL_ALIASES: dict[str, set[str]] = {
    "global": {"global", "globallevel", "overall", "globalcontext", "category", "scene"},
    "attributes": {"attributes", "attribute", "salientattributes", "attributelevel"},
    "details": {"details", "detail", "discriminativedetails", "detaillevel"},
}
_LINE = re.compile(r"^[\s*#>\-\d.]*([A-Za-z][A-Za-z _-]*?)[\s*]*[:=][\s*]*(.+?)\s*$", re.M)


class ParseError(Exception):
    """The answer has no usable caption; ``str(self)`` is the reason stored with the failure."""


@dataclass(frozen=True)
class Caption:
    """A checked caption: the final sentence and the levels the model wrote before it."""

    final: str
    levels: dict[str, str] = field(default_factory=dict)
    missing_levels: tuple[str, ...] = ()


def parse_answer(text: str, spec: PromptSpec) -> Caption:
    """Extract and check the caption in ``text``; raise :class:`ParseError` with the reason."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    fields = _extract_fields(text)
    if fields is None:
        raise ParseError(f"no JSON object and no {FINAL_KEY} line in the answer")
    final = _find(fields, _FINAL_ALIASES)
    if final is None:
        raise ParseError(f"answer has no {FINAL_KEY} key (keys: {sorted(fields)[:8]})")
    if not isinstance(final, str):
        raise ParseError(f"{FINAL_KEY} is a {type(final).__name__}, not a string")
    final = _clean(final)
    check_caption(final, spec.max_words)
    levels: dict[str, str] = {}
    for i, level in enumerate(spec.levels, 1):
        value = _find(fields, _LEVEL_ALIASES[level] | {f"level{i}"})
        value = _clean(_as_text(value)) if value is not None else ""
        if value:
            levels[level] = value
    missing = tuple(lv for lv in spec.levels if lv not in levels)
    return Caption(final=final, levels=levels, missing_levels=missing)


def check_caption(caption: str, max_words: int) -> None:
    """Refuse a final sentence that is empty, too long, not English-script, looping or markup."""
    words = caption.split()
    if not words:
        raise ParseError(f"{FINAL_KEY} is empty")
    letters = [ch for ch in caption if ch.isalpha()]
    latin = sum(ch.isascii() or unicodedata.name(ch, "").startswith("LATIN") for ch in letters)
    if latin < 0.9 * len(letters):
        raise ParseError(f"{FINAL_KEY} is not in English (non-Latin script): {caption[:60]!r}")
    if len(words) > max_words:
        raise ParseError(f"{FINAL_KEY} too long: {len(words)} words > {max_words}")
    if sum(any(c.isalpha() for c in w) for w in words) < 2:
        raise ParseError(f"{FINAL_KEY} has fewer than two words: {caption!r}")
    if "<" in caption or ">" in caption or "{" in caption:
        raise ParseError(f"{FINAL_KEY} holds markup or a template placeholder: {caption[:60]!r}")
    loop = _repeated_ngram([w.lower().strip(".,;:") for w in words])
    if loop:
        raise ParseError(f"{FINAL_KEY} repeats {loop!r} three times in a row (degenerate)")


def _repeated_ngram(words: list[str]) -> str | None:
    """The first 1-4 word n-gram that occurs three times back to back, the sign of a loop."""
    for n in range(1, 5):
        for i in range(len(words) - 3 * n + 1):
            gram = words[i : i + n]
            if gram == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return " ".join(gram)
    return None


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _find(fields: dict[str, Any], aliases: set[str]) -> Any:
    for key, value in fields.items():
        if _norm(key) in aliases:
            return value
    return None


def _as_text(value: Any) -> str:
    """Levels are stored as text; MLLMs sometimes answer a level with a list or an object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_as_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "; ".join(_as_text(v) for v in value)
    return "" if value is None else str(value)


def _clean(text: str) -> str:
    text = " ".join(text.split())
    return text.strip().strip("*_`").strip().strip("\"'").strip()


def _extract_fields(text: str) -> dict[str, Any] | None:
    """The answer's fields: the best JSON object found, else ``key: value`` lines."""
    text = text.translate(_SMART_QUOTES)
    objects: list[dict[str, Any]] = []
    for chunk in [*_FENCE.findall(text), text]:
        objects += _json_objects(chunk)
    for obj in objects:
        for candidate in _nested_dicts(obj):
            flat = _flatten(candidate)
            if _find(flat, _FINAL_ALIASES) is not None:
                return flat
    lines = {m.group(1): m.group(2) for m in _LINE.finditer(text)}
    if _find(lines, _FINAL_ALIASES) is not None:
        return lines
    return _flatten(objects[0]) if objects else None


def _nested_dicts(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``obj`` and every object inside it, outermost first: answers get wrapped in envelopes."""
    yield obj
    for value in obj.values():
        if isinstance(value, dict):
            yield from _nested_dicts(value)


def _flatten(obj: dict[str, Any]) -> dict[str, Any]:
    """Lift a nested ``levels`` object (the store's own layout) to the top level."""
    out = dict(obj)
    nested = out.pop("levels", None)
    if isinstance(nested, dict):
        for key, value in nested.items():
            out.setdefault(key, value)
    return out


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every outermost ``{...}`` span of ``text`` that decodes, after light repairs, to a dict."""
    found = []
    start = text.find("{")
    while start != -1:
        end = _matching_brace(text, start)
        span = text[start : end + 1] if end is not None else text[start:]
        obj = _decode(span)
        if obj is not None:
            found.append(obj)
        start = text.find("{", (end if end is not None and obj is not None else start) + 1)
    return found


def _matching_brace(text: str, start: int) -> int | None:
    depth, quote, escaped = 0, None, False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _decode(span: str) -> dict[str, Any] | None:
    for candidate in (span, _TRAILING_COMMA.sub(r"\1", span)):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(candidate)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        if isinstance(obj, dict):
            return {str(k): v for k, v in obj.items()}
    return None


__all__ = ["LEVELS", "Caption", "ParseError", "check_caption", "parse_answer"]
