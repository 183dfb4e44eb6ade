"""``csmcir fit`` and ``csmcir validate``: LightningCLI over CSMCIRModule and CIRDataModule.

Every option is a flag or a YAML key (``--config synthcir --data.root DIR --data.captions FILE
--trainer.max_steps N``); LightningCLI rejects unknown keys by name. ``--config`` takes a YAML
file or a packaged config's name (``synthcir``, ``cirr``: csmcir/configs/, csmcir.packaged). On top
of Lightning's defaults a run gets, under ``trainer.default_root_dir`` (default
``checkpoints/<benchmark>-<preset>``):

- ``last.ckpt`` (every ``--checkpoint_every`` steps and at each validation) and ``best.ckpt``
  (best ``val/score``), for resuming with ``--ckpt_path``;
- ``model/`` and ``best/``: exported inference folders, written when fit ends;
- ``logs/version_N/``: CSV and TensorBoard logs and the full config of the run (removed again
  when the run fails before logging anything).

A folder that holds an earlier run is refused unless ``--ckpt_path`` resumes it or
``--overwrite true`` deletes its checkpoints and exported models first.

Checkpoints are loaded with ``torch.load(weights_only=True)`` unless ``--weights_only false``.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import CheckpointIO

from csmcir.device import check_accelerator
from csmcir.errors import ConfigError, warn
from csmcir.model.run_folder import LAST_CKPT, LOGS, earlier_run, remove_outputs
from csmcir.outputs import RUN_FOLDER, claim
from csmcir.packaged import config_file
from csmcir.threads import available_cores, describe_threads, lanes_from_env, torch_threads
from csmcir.train.datamodule import CIRDataModule
from csmcir.train.export import ExportModel, NamedCheckpointIO, unreadable_checkpoint
from csmcir.train.module import CSMCIRModule
from csmcir.train.validation import SCORE


class CSMCIRCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint_every",
            type=int,
            default=500,
            help="write last.ckpt every N training steps as well as at validation (0: only then)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start again in a run folder that holds an earlier run, deleting its "
            "checkpoints and exported models first (its logs stay). Without it such a folder is "
            "refused: resume it with --ckpt_path, or train into another folder",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads (default: every core this process may use, divided by "
            "CSMCIR_LANES, the runs a grid puts side by side; csmcir ablate --lanes sets it)",
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path`` once while parsing (for its hyperparameters): a
        file torch cannot read is named there, as :class:`NamedCheckpointIO` names it later."""
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise unreadable_checkpoint(path, e) from None

    def before_instantiate_classes(self) -> None:
        """A GPU the machine lacks is refused now, in one message, not by Lightning's
        traceback once the model and data are built."""
        trainer = self.config[self.config.subcommand]["trainer"]
        check_accelerator(trainer.get("accelerator"), trainer.get("devices"))

    def before_fit(self) -> None:
        self._prepare_run()
        self._claim_run_dir()

    def before_validate(self) -> None:
        self._prepare_run()

    def _prepare_run(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True
        cores, lanes, explicit = available_cores(), lanes_from_env(), config.get("threads")
        threads = torch_threads(cores, lanes, explicit)
        torch.set_num_threads(threads)
        print(describe_threads(threads, cores, lanes, explicit), flush=True)

    def _claim_run_dir(self) -> None:
        """A finished run is never overwritten silently: a new fit would replace its model/ and
        last.ckpt and keep its best/ and best.ckpt, mixing two runs in one folder."""
        config = self.config_init[self.subcommand]
        root = self.run_dir()
        # a new or empty folder, or a run folder: never a dataset or someone's folder
        claim(root, RUN_FOLDER, flag="--trainer.default_root_dir")
        found = earlier_run(root)
        if not found or config.get("ckpt_path"):
            return
        names = ", ".join(p.name for p in found)
        if not config.get("overwrite"):
            raise ConfigError(
                f"{root} holds an earlier run ({names}). Resume it with --ckpt_path "
                f"{root / LAST_CKPT}, train into another folder with "
                "--trainer.default_root_dir DIR, or pass --overwrite true to delete that run's "
                "checkpoints and models and start again"
            )
        remove_outputs(found)
        warn(f"--overwrite: deleted the earlier run's {names} in {root}")

    def run_dir(self) -> Path:
        config = self.config_init[self.subcommand]
        given = config["trainer"].get("default_root_dir")
        if given:
            return Path(given)
        return Path("checkpoints") / f"{config['data'].benchmark}-{config['model'].hparams.preset}"

    @staticmethod
    def _checkpoints(root: Path, every: int) -> list[ModelCheckpoint]:
        """best.ckpt (best val/score) and last.ckpt (each validation, every ``every`` steps)."""
        best = ModelCheckpoint(
            dirpath=root,
            filename="best",
            monitor=SCORE,
            mode="max",
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        if every < 1:
            return [best]
        periodic = ModelCheckpoint(
            dirpath=root,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every,
            enable_version_counter=False,
        )
        return [best, periodic]

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]
        trainer_config = config["trainer"]
        root = self.run_dir()
        kwargs.setdefault("default_root_dir", str(root))
        logger = trainer_config.get("logger")
        cleanup = None
        if logger is None or logger is True:
            version = next_version(root / LOGS)  # one folder for both loggers
            logger = [
                CSVLogger(root, name=LOGS, version=version),
                TensorBoardLogger(root, name=LOGS, version=version, default_hp_metric=False),
            ]
            kwargs["logger"] = logger
            cleanup = RemoveEmptyLogs(root / LOGS / version, root)
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, NamedCheckpointIO()]  # an unreadable --ckpt_path named
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        callbacks.append(ExportModel(root))
        if trainer_config.get("enable_checkpointing") is not False:
            callbacks += self._checkpoints(root, config.get("checkpoint_every", 0))
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if cleanup is not None:
            callbacks.append(cleanup)
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


class RemoveEmptyLogs(L.Callback):
    """A run that fails before it logged anything leaves no ``logs/version_N`` behind (nor the
    ``logs/`` and run folders, when this run created them and they are left empty)."""

    def __init__(self, log_dir: Path, root: Path) -> None:
        self.log_dir = log_dir
        self.made = [p for p in (root / LOGS, root) if not p.exists()]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not trainer.is_global_zero or trainer.global_step or trainer.logged_metrics:
            return
        # The loggers close their files after this hook; on Linux that is harmless.
        shutil.rmtree(self.log_dir, ignore_errors=True)
        for folder in self.made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def next_version(folder: Path) -> str:
    """``version_N`` with N one past the highest in ``folder``: each run logs apart."""
    taken = [
        int(p.name.removeprefix("version_"))
        for p in folder.glob("version_*")
        if p.name.removeprefix("version_").isdigit()
    ]
    return f"version_{max(taken, default=-1) + 1}"


def with_config_files(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value that names a packaged config replaced by its
    file. A value holding YAML text (LightningCLI takes that too) is left as it is."""
    out, expect_value = [], False
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if expect_value:
            out.append(_config_value(arg))
        elif sep and flag in ("--config", "-c"):
            out.append(f"{flag}={_config_value(value)}")
        else:
            out.append(arg)
        expect_value = not sep and arg in ("--config", "-c")
    return out


def _config_value(value: str) -> str:
    return value if ":" in value or "{" in value else str(config_file(value))


def run(argv: list[str] | None) -> CSMCIRCLI:
    """Parse ``argv`` (``None``: ``sys.argv``), run the subcommand; the CLI keeps model,
    datamodule and trainer for inspection."""
    if argv is None:  # rewritten in place: the DDP launcher re-runs sys.argv
        sys.argv[1:] = with_config_files(sys.argv[1:])
    else:
        argv = with_config_files(argv)
    # The run folder holds the logs as well as the checkpoints; that is by design.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return CSMCIRCLI(
        CSMCIRModule,
        CIRDataModule,
        args=argv,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "csmcir"},
    )


def main(argv: list[str]) -> int:
    """``argv`` starts with the subcommand (``fit`` or ``validate``), as csmcir.cli passes it."""
    # None: LightningCLI parses sys.argv itself (the DDP launcher re-runs that command line).
    run(None if argv == sys.argv[1:] else argv)
    return 0
