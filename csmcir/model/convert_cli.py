"""``csmcir convert lavis``: a LAVIS or SPRC BLIP-2 state dict into a BLIP-2 folder.

    csmcir convert lavis blip2_pretrained.pth --tokenizer google-bert/bert-base-uncased \\
        --vision Salesforce/blip2-itm-vit-g --out checkpoints/blip2-lavis
    csmcir convert lavis sprc_cirr.pt --tokenizer DIR --out checkpoints/sprc-cirr  # local copy

The folder is a transformers ``Blip2ForImageTextRetrieval`` folder: ``--model.weights``,
``--model.init_from``, ``--model`` of ``csmcir eval`` and ``CSMCIR.from_pretrained`` load it.
Keys with no place in BLIP-2 are listed, and so are the head counts and epsilons the shapes
cannot tell (both kept in the folder's lavis_conversion.json). --tokenizer and --vision take a
local path or a hub name (fetched into the hub cache, only the files read).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True)
    lavis = sub.add_parser("lavis", help="LAVIS Blip2Qformer (stage 1) or SPRC state dict")
    lavis.add_argument("checkpoint", type=Path, help=".pth / .pt, with or without a wrapper")
    lavis.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="LAVIS's bert-base-uncased tokenizer: a folder or google-bert/bert-base-uncased",
    )
    lavis.add_argument("--out", type=Path, required=True, help="new folder to write")
    lavis.add_argument(
        "--vision",
        type=Path,
        help="where the ViT comes from when the checkpoint has none (LAVIS saves only trainable "
        "weights): a BLIP-2 folder or hub name, or eva_vit_g.pth with --vision-layers 39",
    )
    lavis.add_argument("--vision-layers", type=int, help="ViT blocks BLIP-2 keeps (EVA ViT-g: 39)")
    lavis.add_argument("--vision-heads", type=int, help="ViT heads (default: 16 for ViT-g)")
    lavis.add_argument("--qformer-heads", type=int, help="Q-Former heads (default: 12 for BERT)")
    args = parser.parse_args(argv)

    from csmcir.model.lavis import convert_lavis

    record = convert_lavis(
        args.checkpoint,
        args.tokenizer,
        args.out,
        vision=args.vision,
        vision_layers=args.vision_layers,
        vision_heads=args.vision_heads,
        qformer_heads=args.qformer_heads,
    )
    print(record.summary(args.out))
    return 0
