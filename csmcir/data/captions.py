"""Reading target-caption files, whatever wrote them, and checking what they describe.

Three forms are accepted, all a JSON object keyed by image id:
- the merged file of ``csmcir caption merge``: ``{id: {"levels": {...}, "Final_Caption": ...,
  "prompt_version", "model", "benchmark", "run", "image_sha256"}}``: each caption names the
  benchmark and the caption run it came from and the fingerprint of its image;
- the released CSMCIR caption files: ``{id: {"Final_Caption": ...}}`` (other keys ignored);
- plain strings: ``{id: "a caption"}``.

A caption describes one image, so a merged file carries each image's fingerprint (a SHA-256
prefix of its bytes). Read against the images it is used for, a caption whose fingerprint
disagrees is refused: another benchmark with the same image ids would otherwise be scored with
captions of other pictures, without a word. A file without fingerprints (the released form) is
read, saying what could not be checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csmcir.data.layout import first_few
from csmcir.errors import DataError, warn
from csmcir.io import read_json
from csmcir.outputs import file_digest

FINAL_KEY = "Final_Caption"
IMAGE_KEY = "image_sha256"  # the fingerprint of the image a caption describes
BENCHMARK_KEY, RUN_KEY = "benchmark", "run"  # the benchmark and the caption run it came from


def caption_writers(path: str | Path) -> set[str]:
    """The captioning models a caption file names (the ``model`` of each record of a merged
    file, e.g. ``oracle(noise=0,seed=0)``); empty for files that name none."""
    data = read_json(path, "caption file")
    values = data.values() if isinstance(data, dict) else []
    return {v["model"] for v in values if isinstance(v, dict) and isinstance(v.get("model"), str)}


def load_captions(
    path: str | Path,
    images: Mapping[str, str | Path] | None = None,
    *,
    benchmark: str | None = None,
    flag: str = "--captions",
) -> dict[str, str]:
    """Map image id -> final caption. Empty or non-text captions are an error, never kept.

    ``images`` (id -> file) and ``benchmark``: what the captions are about to be used for; the
    benchmark and image fingerprints the file records must agree with them
    (:func:`check_identity`).
    """
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
        raise DataError(
            f"caption file {path}: {len(bad)} entries have no usable caption "
            f"(a string, or an object with a non-empty {FINAL_KEY!r}): {first_few(bad)}"
        )
    if images is not None:
        entries = {str(i): v for i, v in data.items() if isinstance(v, dict)}
        check_identity(Path(path), entries, images, benchmark, flag)
    return captions


def check_identity(
    path: Path,
    entries: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, str | Path],
    benchmark: str | None,
    flag: str,
) -> None:
    """Refuse captions made for another benchmark or of other images than ``images``."""
    used = [i for i in images if IMAGE_KEY in entries.get(i, {})]
    if not any(IMAGE_KEY in e for e in entries.values()):
        warn(
            f"{flag} {path} records no image fingerprints (the released CSMCIR form, or a file "
            "of an older csmcir): whether its captions describe these images could not be "
            "checked"
        )
        return
    made_for = sorted({str(e.get(BENCHMARK_KEY)) for e in entries.values() if BENCHMARK_KEY in e})
    if benchmark and made_for and made_for != [benchmark]:
        raise DataError(
            f"{flag} {path} holds captions of {', '.join(made_for)}, not of {benchmark}: give "
            f"{flag} the caption file of this benchmark (csmcir caption run | merge)"
        )
    wrong = [i for i in used if not _same_image(images[i], entries[i][IMAGE_KEY])]
    if wrong:
        runs = sorted({str(entries[i].get(RUN_KEY)) for i in wrong})
        raise DataError(
            f"{flag} {path} describes other images than these: {len(wrong)} of the {len(used)} "
            f"captioned images differ from the pictures its captions were made of "
            f"({first_few(wrong)}; caption run {', '.join(runs)}). Give {flag} the caption "
            "file of this benchmark folder, or caption it (csmcir caption run | merge)"
        )


def _same_image(path: str | Path, fingerprint: str) -> bool:
    """Whether the file is the image ``fingerprint`` was taken of (an unreadable file passes:
    its loader names it)."""
    try:
        return file_digest(path, len(fingerprint)) == fingerprint
    except OSError:
        return True
