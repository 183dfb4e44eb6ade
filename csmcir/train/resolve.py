"""What a ``csmcir fit`` command would train with, found without training.

:func:`resolve` gives, per command, the configuration LightningCLI would save for that run
(``logs/version_N/config.yaml``: every default filled in, memory-bank settings given as a
mapping included) and the model config its preset and ``model_options`` give. The ablation runner
keys each finished cell by these, so a default changed in the code reruns exactly the cells it
reaches. Resolving imports torch and Lightning (seconds, and most of a gigabyte), so the runner
does it for a whole grid in one subprocess (:func:`resolve_in_subprocess`) and stays light while
its runs train.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from csmcir.errors import ConfigError, CsmcirError
from csmcir.io import atomic_write_json, read_json

Resolved = dict[str, Any] | str  # {"fit": ..., "model": ...}, or why the command is invalid


def fit_config(argv: list[str]) -> dict[str, Any]:
    """The configuration ``csmcir fit|validate ...`` (``argv`` starts with the subcommand) runs
    with, as LightningCLI dumps it (its ``--print_config``); nothing is built. An invalid command
    is a ConfigError with the parser's message."""
    import yaml

    from csmcir.train.cli import run

    out, err = io.StringIO(), io.StringIO()
    quiet = warnings.catch_warnings()  # LightningCLI's note on args given beside sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), quiet:
        warnings.simplefilter("ignore")
        try:
            run([*argv, "--print_config"])
        except SystemExit as stop:
            code = stop.code
        else:
            raise RuntimeError("--print_config did not stop the command")
    if code:
        message = " ".join(err.getvalue().rsplit("error:", 1)[-1].split())  # on one line
        raise ConfigError(f"csmcir {argv[0]}: {message or f'exit status {code}'}")
    return yaml.safe_load(out.getvalue())


def model_config(fit: dict[str, Any]) -> dict[str, Any] | None:
    """The model config a resolved fit config builds from its preset, ``model_options`` merged in
    (before the tokenizer or a weights folder is read); None for a run that starts from
    ``init_from`` weights, whose config comes with them."""
    from csmcir.model.registry import load_preset

    model = fit["model"]
    if model.get("init_from") is not None:
        return None
    return (
        load_preset(model["preset"]).config.replace(**(model.get("model_options") or {})).to_dict()
    )


def resolve(fit_argvs: list[list[str]]) -> list[Resolved]:
    """For each fit command (``["fit", "--config", ...]``) ``{"fit": config, "model": model
    config}``, or the error that stops it. A memory bank that is not enabled resolves to None:
    CSMCIRModule builds no bank then, so its settings change nothing."""
    resolved: list[Resolved] = []
    for argv in fit_argvs:
        try:
            fit = fit_config(argv)
            bank = fit["model"].get("bank")
            if not (bank and bank.get("enabled")):
                fit["model"]["bank"] = None
            resolved.append({"fit": fit, "model": model_config(fit)})
        except CsmcirError as e:
            resolved.append(str(e))
    return resolved


def resolve_in_subprocess(fit_argvs: list[list[str]]) -> list[Resolved]:
    """:func:`resolve` in a fresh ``python -m csmcir.train.resolve``: the caller imports no torch,
    and the code on disk now is what is resolved."""
    with tempfile.TemporaryDirectory(prefix="csmcir-resolve-") as tmp:
        given, answer = Path(tmp) / "commands.json", Path(tmp) / "resolved.json"
        atomic_write_json(given, fit_argvs)
        done = subprocess.run(
            [sys.executable, "-m", "csmcir.train.resolve", str(given), str(answer)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 or not answer.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise ConfigError(f"resolving the grid's fit configs failed: {last}")
        return read_json(answer, "resolved fit configs")


def main(argv: list[str]) -> int:
    """``python -m csmcir.train.resolve COMMANDS.json OUT.json``: a JSON list of fit commands in,
    the list :func:`resolve` gives out."""
    given, answer = argv
    atomic_write_json(answer, resolve(read_json(given, "fit commands")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
