"""``csmcir data``: generate the synthetic benchmark, check a dataset on disk."""

from __future__ import annotations

import argparse

from csmcir.data import check, synth


def main(argv: list[str]) -> int | None:
    parser = argparse.ArgumentParser(prog="csmcir data", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    synth.add_arguments(sub.add_parser("synth", help="generate the synthetic CIR benchmark"))
    check.add_arguments(sub.add_parser("check", help="validate a benchmark on disk"))
    args = parser.parse_args(argv)
    return {"synth": synth.run, "check": check.run}[args.action](args)
