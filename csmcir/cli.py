"""The ``csmcir`` command: a thin dispatcher to one module per verb.

Each verb's module is imported only when that verb runs, so ``csmcir data synth`` does not pay
for importing torch. A verb module exposes ``main(argv: list[str]) -> int | None``, and may
expose ``resume_hint(argv: list[str]) -> str | None``: what a run stopped by Ctrl+C keeps when
the same command is run again to go on.
"""

from __future__ import annotations

import importlib
import shlex
import sys

from csmcir.errors import CsmcirError

# verb -> (module, one-line help). Keep in the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("csmcir.quickstart", "the whole method end to end on the synthetic benchmark"),
    "data": ("csmcir.data.cli", "datasets: synth (generate the synthetic benchmark), check"),
    "caption": ("captioning.cli", "offline MCoT captioning: run, merge, show"),
    "convert": ("csmcir.model.convert_cli", "other codebases' weights into BLIP-2 folders: lavis"),
    "features": ("csmcir.model.features_cli", "frozen-ViT feature cache: extract"),
    "fit": ("csmcir.train.cli", "train a model (LightningCLI)"),
    "validate": ("csmcir.train.cli", "validate a model (LightningCLI)"),
    "eval": ("csmcir.evaluation.cli", "Recall@K / mAP@K on a benchmark, test-server submissions"),
    "index": ("csmcir.retrieval.cli", "build a faiss gallery index"),
    "search": ("csmcir.retrieval.search_cli", "query an index with a reference image and a text"),
    "demo": ("csmcir.demo", "browser retrieval demo (Gradio)"),
    "plot": ("csmcir.plots.cli", "pictures: embeddings"),
    "ablate": ("csmcir.ablation", "train and evaluate a grid of ablation variants"),
    "export": ("csmcir.model.export_cli", "a trained model for other tools: hf (transformers)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: csmcir <command> [options]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {helptext}" for verb, (_, helptext) in COMMANDS.items()]
    lines += ["", "Run 'csmcir <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if argv[0] == "--version":
        from csmcir import __version__

        print(f"csmcir {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"csmcir: unknown command {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[verb][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"csmcir: command {verb!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        code = module.main([verb, *rest] if verb in {"fit", "validate"} else rest)
    except CsmcirError as e:
        print(f"csmcir {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(verb, module, rest)
    except SystemExit as e:
        # Lightning meets Ctrl+C with its own shutdown and then sys.exit(1)
        if isinstance(e.__context__, KeyboardInterrupt):
            return interrupted(verb, module, rest)
        raise
    return int(code or 0)


def interrupted(verb: str, module, rest: list[str]) -> int:
    """Say that Ctrl+C stopped the command and, where the verb can go on, the command that
    does; exit status 130 (128 + SIGINT), as a shell reports it."""
    kept = getattr(module, "resume_hint", lambda _: None)(rest)
    said = f"csmcir {verb}: interrupted"
    if kept:
        again = shlex.join(["csmcir", verb, *rest])
        said += f"; {kept}. To go on, run the same command again: {again}"
    print(said, file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
