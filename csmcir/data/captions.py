"""Reading target-caption files, whatever wrote them, and checking what they describe.

Three forms are accepted, all a JSON object keyed by image id:
- the merged file of ``csmcir caption merge``: ``{id: {"levels": {...}, "Final_Caption": ...,
  "image_sha256": ...}}`` plus its provenance record under ``"@csmcir"`` (the benchmark, its
  root and split, the caption run);
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

from csmcir.data.layout import first_few
from csmcir.errors import DataError, warn
from csmcir.io import read_json
from csmcir.outputs import RECORD_KEY, file_digest

FINAL_KEY = "Final_Caption"
IMAGE_KEY = "image_sha256"  # the fingerprint of the image a caption describes


def load_captions(
    path: str | Path,
    images: Mapping[str, str | Path] | None = None,
    *,
    benchmark: str | None = None,
    flag: str = "--captions",
) -> dict[str, str]:
    """Map image id -> final caption. Empty or non-text captions are an error, never kept.

    ``images`` (id -> file) and ``benchmark``: what the captions are about to be used for; the
    file's recorded benchmark and image fingerprints must agree with them (:func:`check_identity`).
    """
    data = read_json(path, "caption file")
    if not isinstance(data, dict):
        raise DataError(
            f"caption file {path}: expected a JSON object keyed by image id, "
            f"got {type(data).__name__}"
        )
    provenance = data.pop(RECORD_KEY, None)
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
        fingerprints = {
            str(i): v[IMAGE_KEY] for i, v in data.items() if isinstance(v, dict) and IMAGE_KEY in v
        }
        check_identity(Path(path), provenance, fingerprints, images, benchmark, flag)
    return captions


def check_identity(
    path: Path,
    provenance: dict | None,
    fingerprints: Mapping[str, str],
    images: Mapping[str, str | Path],
    benchmark: str | None,
    flag: str,
) -> None:
    """Refuse captions made for another benchmark or for other images than ``images``."""
    ident = (provenance or {}).get("identity") or {}
    made_for = (
        f"{ident.get('benchmark')} {ident.get('split')} at {ident.get('root')}"
        if ident
        else "an unrecorded benchmark"
    )
    if benchmark and ident.get("benchmark") and ident["benchmark"] != benchmark:
        raise DataError(
            f"{flag} {path} holds captions of {made_for}, not of {benchmark}: give {flag} the "
            f"caption file of this benchmark (csmcir caption run | merge)"
        )
    used = [i for i in images if i in fingerprints]
    if not fingerprints:
        warn(
            f"{flag} {path} records no image fingerprints (the released CSMCIR form, or a file "
            "of an older csmcir): whether its captions describe these images could not be "
            "checked"
        )
        return
    wrong = [
        i
        for i in used
        if image_digest(images[i], len(fingerprints[i])) not in (fingerprints[i], None)
    ]
    if wrong:
        raise DataError(
            f"{flag} {path} describes other images than these: {len(wrong)} of the {len(used)} "
            f"captioned images differ from the ones it was made from ({first_few(wrong)}); it "
            f"was made for {made_for}. Give {flag} the caption file of this benchmark folder, "
            "or caption it (csmcir caption run | merge)"
        )


def image_digest(path: str | Path, length: int) -> str | None:
    """An image's fingerprint; None for a file that cannot be read (its loader names it)."""
    try:
        return file_digest(path, length)
    except OSError:
        return None
