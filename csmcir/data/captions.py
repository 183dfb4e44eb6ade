"""Reading target-caption files, whatever wrote them.

Three forms are accepted, all a JSON object keyed by image id:
- the merged file of ``csmcir caption merge``: ``{id: {"levels": {...}, "Final_Caption": ...}}``;
- the released CSMCIR caption files: ``{id: {"Final_Caption": ...}}`` (other keys ignored);
- plain strings: ``{id: "a caption"}``.
"""

from __future__ import annotations

from pathlib import Path

from csmcir.errors import DataError
from csmcir.io import read_json

FINAL_KEY = "Final_Caption"


def load_captions(path: str | Path) -> dict[str, str]:
    """Map image id -> final caption. Empty or non-text captions are an error, never kept."""
    data = read_json(path, "caption file")
    if not isinstance(data, dict):
        raise DataError(
            f"caption file {path}: expected a JSON object keyed by image id, "
            f"got {type(data).__name__}"
        )
    captions: dict[str, str] = {}
    bad: list[str] = []
    for image_id, value in data.items():
        text = value.get(FINAL_KEY) if isinstance(value, dict) else value
        if isinstance(text, str) and text.strip():
            captions[str(image_id)] = text.strip()
        else:
            bad.append(str(image_id))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"caption file {path}: {len(bad)} entries have no usable caption "
            f"(a string, or an object with a non-empty {FINAL_KEY!r}): {shown}"
        )
    return captions
