"""``csmcir export hf``: a trained shared-tower model as a transformers BLIP-2 folder.

    csmcir export hf checkpoints/cirr-blip2 --out exports/cirr-blip2-hf

MODEL is a run folder (its final ``model/``, as eval and index build take it), an exported
CSMCIR folder (``<run>/best`` for the best validation checkpoint) or a BLIP-2 folder. The
folder loads with ``Blip2ForImageTextRetrieval.from_pretrained`` and ``AutoProcessor``, and
its README.md is a hub model card: metadata (library, tags, base model, datasets, licence, a
``model-index`` of the evaluation results measured on this model) and the transformers usage.
Before it ends the command runs that usage on random inputs and compares it with the model's
own embeddings (``--no-verify`` skips the check).
"""

from __future__ import annotations

import argparse
from pathlib import Path

VERIFY_TEXTS = [
    "a red dress with long sleeves",
    "make it shorter and blue",
    # longer than any model reads: truncation is part of the documented usage
    " ".join(["same shirt but with wider stripes and a collar"] * 40),
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="transformers Blip2ForImageTextRetrieval folder")
    hf.add_argument("model", type=Path, help="a run folder, an exported CSMCIR or a BLIP-2 folder")
    hf.add_argument("--out", type=Path, required=True, help="new folder to write")
    hf.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    hf.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[],
        help="csmcir eval results files for the card's model-index, beside those of this model "
        "found in the run folder and runs/eval/ (each must be this model's)",
    )
    hf.add_argument(
        "--base-model",
        help="hub name of the weights training started from (default: the fit's --model.weights "
        "when a hub name, else the preset's published weights, e.g. Salesforce/blip2-itm-vit-g)",
    )
    hf.add_argument(
        "--license",
        default="apache-2.0",
        help="the card's licence id (default apache-2.0, csmcir's own; check the base model's "
        "and the training data's terms)",
    )
    hf.add_argument("--name", help="the model's name on its card (default: the --out folder's)")
    args = parser.parse_args(argv)

    from csmcir.model import CSMCIR
    from csmcir.model.hf_export import check_exportable, export_hf, notes, verify
    from csmcir.model.model_card import (
        base_model_of,
        find_results,
        fit_settings,
        model_card,
        run_folder_of,
    )
    from csmcir.model.run_folder import model_folder

    model_dir = model_folder(args.model, "MODEL")
    model = CSMCIR.from_pretrained(model_dir)
    check_exportable(model)
    fingerprint = model.fingerprint()
    run_dir = run_folder_of(model_dir)
    results = find_results(fingerprint, run_dir, args.results)
    settings = fit_settings(run_dir)
    card = model_card(
        model,
        args.name or args.out.resolve().name,
        results,
        fingerprint=fingerprint,
        base_model=args.base_model or base_model_of(model, settings),
        license=args.license,
        trained_on=settings.get("data", {}).get("benchmark"),
        notes=notes(model),
    )
    report = export_hf(model, args.out, card=str(card))
    print(report.summary())
    found = ", ".join(
        f"{r.benchmark} {r.config or ''} {r.split}".replace("  ", " ") for r in results
    )
    print(f"model card: {args.out / 'README.md'} (results: {found or 'none found'})")
    if not args.no_verify:
        diff = verify(model, args.out, VERIFY_TEXTS)
        print(
            "verified with transformers (AutoProcessor + Blip2ForImageTextRetrieval, the card's "
            f"usage): embeddings max |diff| {diff:.2e}"
        )
    return 0
