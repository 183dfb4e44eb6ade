"""``csmcir export hf``: a trained shared-tower model as a transformers BLIP-2 folder.

    csmcir export hf checkpoints/cirr-blip2/best --out exports/cirr-blip2-hf

The folder loads with ``Blip2ForImageTextRetrieval.from_pretrained`` (and ``AutoProcessor``),
and transformers' multimodal pass gives this model's embeddings; the command checks that on
random inputs before it ends (``--no-verify`` skips the check).
"""

from __future__ import annotations

import argparse
from pathlib import Path

VERIFY_TEXTS = ["a red dress with long sleeves", "make it shorter and blue"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="transformers Blip2ForImageTextRetrieval folder")
    hf.add_argument("model", type=Path, help="an exported CSMCIR folder (or a BLIP-2 folder)")
    hf.add_argument("--out", type=Path, required=True, help="new folder to write")
    hf.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    args = parser.parse_args(argv)

    from csmcir.model import CSMCIR
    from csmcir.model.hf_export import export_hf, max_difference

    model = CSMCIR.from_pretrained(args.model)
    report = export_hf(model, args.out)
    print(report.summary())
    if not args.no_verify:
        diff = max_difference(model, args.out, VERIFY_TEXTS)
        print(f"verified with transformers: query embeddings max |diff| {diff:.2e}")
    return 0
