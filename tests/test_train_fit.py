"""``csmcir fit`` end to end on a small synthetic benchmark with the real tiny model and loaders."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from csmcir import cli as csmcir_cli
from csmcir.data.registry import load_split
from csmcir.errors import ConfigError, DataError
from csmcir.model import CSMCIR
from csmcir.packaged import config_file
from csmcir.threads import LANES_ENV
from csmcir.train.cli import run
from csmcir.train.datamodule import CIRDataModule, caption_command
from csmcir.train.datasets import first_clauses
from csmcir.train.export import NamedCheckpointIO, model_from_checkpoint
from csmcir.train.module import CSMCIRModule

CONFIG = config_file("synthcir")
BATCH = 8


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core test machine two threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit_args(root: Path, captions: Path | None, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        "--data.root",
        str(root),
        "--data.captions",
        str(captions) if captions else "null",
        "--data.batch_size",
        str(BATCH),
        "--data.val_batch_size",
        "64",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--model.warmup_steps",
        "2",
        "--checkpoint_every",
        "0",
        *extra,
    ]


def read_metrics(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with (run_dir / "logs" / f"version_{version}" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def embed(model: CSMCIR, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((root / "val").glob("*.png"))[:4]]
    texts = ["add a red circle", "remove the cross", "make it blue", "move it left"]
    model.eval()
    with torch.no_grad():
        return (
            model.encode_query(texts, images=images),
            model.encode_target(texts, images=images),
        )


def test_fit_validates_checkpoints_and_exports(synthcir: Path, captions: Path, tmp_path: Path):
    cli = run(fit_args(synthcir, captions, tmp_path))
    for name in ("last.ckpt", "best.ckpt", "model/model.safetensors", "best/config.json"):
        assert (tmp_path / name).is_file(), name
    rows = read_metrics(tmp_path)
    losses = series(rows, "train/loss")
    assert sorted(losses) == list(range(6)) and all(math.isfinite(v) for v in losses.values())
    assert set(series(rows, "train/candidates").values()) == {float(BATCH)}
    scores = series(rows, "val/score")
    assert len(scores) == 2 and all(0 <= v <= 100 for v in scores.values())
    for key in ("val/R@1", "val/R@10", "val/R@50", "val/Rsubset@1", "val/Avg"):
        assert len(series(rows, key)) == 2, key
    assert all(0.01 <= t <= 0.5 for t in series(rows, "train/temperature").values())
    # the exported folder gives the trained module's embeddings
    exported = CSMCIR.from_pretrained(tmp_path / "model")
    pairs = zip(embed(cli.model.model, synthcir), embed(exported, synthcir), strict=True)
    for ours, theirs in pairs:
        assert torch.allclose(ours, theirs, atol=1e-6)
    record = (tmp_path / "model" / "training.json").read_text()
    assert '"global_step": 6' in record
    # best/ holds the weights of best.ckpt, rebuilt from the checkpoint alone
    best = CSMCIR.from_pretrained(tmp_path / "best")
    rebuilt = model_from_checkpoint(tmp_path / "best.ckpt")
    for ours, theirs in zip(embed(rebuilt, synthcir), embed(best, synthcir), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)

    # validate from the last checkpoint: same weights, same figures as the end of fit
    last_score = scores[max(scores)]
    check = run(
        [
            "validate",
            *fit_args(synthcir, captions, tmp_path / "validate")[1:],
            "--ckpt_path",
            str(tmp_path / "last.ckpt"),
        ]
    )
    assert check.trainer.callback_metrics["val/score"].item() == pytest.approx(last_score)


def test_a_finished_run_is_never_overwritten_silently(
    synthcir: Path, captions: Path, tmp_path: Path, capsys
):
    run(fit_args(synthcir, captions, tmp_path))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = fit_args(synthcir, captions, tmp_path, "--trainer.max_steps", "1")
    assert csmcir_cli.main(again) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds an earlier run (model, best, last.ckpt, best.ckpt)" in err
    assert f"--ckpt_path {tmp_path / 'last.ckpt'}" in err and "--overwrite true" in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing touched, no new log folder
    # --overwrite: the old run's checkpoints and models go first, so none of them survives
    # beside the new run's (this one does not validate: no best/ of its own)
    run([*again, "--trainer.limit_val_batches", "0", "--overwrite", "true"])
    assert "--overwrite: deleted the earlier run's model, best, last.ckpt, best.ckpt" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.ckpt").exists()
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["global_step"] == 1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0", "version_1"]


def test_resume_continues_the_same_trajectory(
    synthcir: Path, captions: Path, tmp_path: Path, capsys
):
    """12 steps straight vs resumed from step 6 (mid-epoch) and from step 8 (an epoch's end)."""
    snapshots = tmp_path / "snapshots"
    extra = tmp_path / "snapshot.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {snapshots}, filename: 'snap-{{step}}', "
        "every_n_train_steps: 2, save_top_k: -1}\n"
    )
    longer = ("--trainer.max_steps", "12", "--trainer.val_check_interval", "4")
    straight = tmp_path / "straight"
    run(fit_args(synthcir, captions, straight, "--config", str(extra), *longer))
    a = read_metrics(straight)
    loss_a, lr_a = series(a, "train/loss"), series(a, "lr-AdamW/pg1")
    for start in (6, 8):  # 8 training batches an epoch
        resumed = tmp_path / f"resumed-{start}"
        snapshot = snapshots / f"snap-step={start}.ckpt"
        run(fit_args(synthcir, captions, resumed, *longer, "--ckpt_path", str(snapshot)))
        b = read_metrics(resumed)
        loss_b, lr_b = series(b, "train/loss"), series(b, "lr-AdamW/pg1")
        assert sorted(loss_b) == list(range(start, 12))
        for step in range(start, 12):
            assert loss_b[step] == pytest.approx(loss_a[step], rel=1e-5, abs=1e-6), (start, step)
        assert all(lr_b[s] == pytest.approx(lr_a[s]) for s in lr_b)
        assert series(b, "val/score")[11] == pytest.approx(series(a, "val/score")[11])

    # Another batch size (or seed) would continue with other samples: refused, as the seed is.
    snapshot = str(snapshots / "snap-step=6.ckpt")
    for change, message in (
        (("--data.batch_size", "4"), "trained with batch_size 8, this run has 4"),
        (("--seed_everything", "1"), "the checkpoint's data seed is 0, this run's is 1"),
    ):
        other = fit_args(synthcir, captions, tmp_path / "other", *longer, "--ckpt_path", snapshot)
        assert csmcir_cli.main([*other, *change]) == 2
        assert message in capsys.readouterr().err


def test_missing_captions_give_the_command_that_makes_them(
    synthcir: Path, captions: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"  # partial.json goes beside it: fit writes only into a run folder
    assert csmcir_cli.main(fit_args(synthcir, None, run_dir)) == 2
    err = capsys.readouterr().err
    assert "no caption file was given" in err
    assert caption_command("synthcir", synthcir, synthcir / "mcot_captions.json") in err

    partial = tmp_path / "partial.json"
    kept = dict(list(json.loads(captions.read_text()).items())[:10])
    partial.write_text(json.dumps(kept))
    assert csmcir_cli.main(fit_args(synthcir, partial, run_dir)) == 2
    err = capsys.readouterr().err
    assert "target images have no caption" in err and "csmcir caption run" in err

    assert csmcir_cli.main(fit_args(synthcir, tmp_path / "nope.json", run_dir)) == 2
    assert "caption file not found" in capsys.readouterr().err
    # failed runs leave no empty logs/version_N folders (nor logs/ itself)
    assert not (run_dir / "logs").exists()
    assert csmcir_cli.main(fit_args(synthcir, None, tmp_path / "new")) == 2
    assert not (tmp_path / "new").exists()


def test_an_image_text_run_trains_stage_one_and_a_cir_run_starts_from_it(
    synthcir: Path, captions: Path, tmp_path: Path
):
    stage_one = tmp_path / "stage1"
    stage_one_args = ["--model.objective", "image_text", "--model.image_text_matching", "true"]
    cli = run(fit_args(synthcir, captions, stage_one, *stage_one_args))
    rows = read_metrics(stage_one)
    assert sorted(series(rows, "train/image_text_loss")) == list(range(6))
    # BLIP-2's matching loss: a third of the pairs match, so an untrained head is near ln 2
    matching = series(rows, "train/matching_loss")
    assert sorted(matching) == list(range(6)) and 0.4 < matching[0] < 1.2
    assert not series(rows, "train/loss")
    trained = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in cli.model.matching_head.parameters()} <= trained
    start = CSMCIR.from_pretrained(stage_one / "model")
    # the head is stage 1's own: the exported model is the encoder as it was trained
    assert start.fingerprint() == cli.model.model.eval().fingerprint()
    cli = run(
        fit_args(
            synthcir,
            captions,
            tmp_path / "cir",
            "--model.init_from",
            str(start_dir := stage_one / "model"),
        )
    )
    assert sorted(series(read_metrics(tmp_path / "cir"), "train/loss")) == list(range(6))
    assert cli.model.model.tokenizer.get_vocab() == start.tokenizer.get_vocab()
    assert str(start_dir) == cli.model.hparams.init_from
    with pytest.raises(ConfigError, match=r"--model\.objective must be cir or image_text"):
        CSMCIRModule(objective="itc")
    with pytest.raises(ConfigError, match="image_text_matching is a stage-1 option"):
        CSMCIRModule(image_text_matching=True)


def test_fit_says_before_training_which_texts_the_model_cuts(
    synthcir: Path, captions: Path, tmp_path: Path, capsys
):
    one_step = ("--trainer.max_steps", "1", "--trainer.val_check_interval", "1")
    run(fit_args(synthcir, captions, tmp_path / "whole", *one_step))
    assert "longer than the model reads" not in capsys.readouterr().err
    short = ("--model.model_options", "{max_text_length: 12}")
    cli = run(fit_args(synthcir, captions, tmp_path / "cut", *one_step, *short))
    # known answer: the texts with more than 12 tokens, [CLS] and [SEP] included
    split = load_split("synthcir", synthcir, "train")
    tokenizer, texts = cli.model.model.tokenizer, {q.texts[0] for q in split.queries}
    mods = sum(len(tokenizer(t)["input_ids"]) > 12 for t in texts)
    caps = json.loads(captions.read_text())
    targets = [caps[i]["Final_Caption"] for i in {q.target for q in split.queries}]
    long_captions = sum(len(tokenizer(t)["input_ids"]) > 12 for t in targets)
    assert 0 < mods < len(texts) and 0 < long_captions <= len(targets)
    assert (
        f"{mods} of {len(texts)} modification texts and {long_captions} of {len(targets)} "
        "target captions of the training data are longer than the model reads"
    ) in capsys.readouterr().err
    # cut to their first clause, as training reads them, no caption is too long
    run(fit_args(synthcir, captions, tmp_path / "clauses", *one_step, *short,
                 "--data.caption_clauses", "1"))  # fmt: skip
    assert sum(len(tokenizer(first_clauses(t, 1))["input_ids"]) > 12 for t in targets) == 0
    assert (
        f"{mods} of {len(texts)} modification texts of the training data are longer"
    ) in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a step without a trainer
def test_stage_one_contrastive_loss_reads_first_clauses_and_matching_whole_captions():
    """With contrastive_clauses the contrastive side reads each caption's first clauses, and
    the matching loss, the joint pass CIR fine-tuning reads, the captions whole."""
    captions = ["large red square top left, small blue circle center", "small green cross center"]
    module = CSMCIRModule(objective="image_text", image_text_matching=True, contrastive_clauses=1)
    module.model = CSMCIR.from_preset("tiny", captions, vocab_size=256, seed=0)
    module._build_matching_head()
    read: dict[str, list[str]] = {}

    def recording(name: str):
        encode = getattr(module.model, name)

        def encode_and_record(texts: list[str], **inputs):
            read[name] = list(texts)
            return encode(texts, **inputs)

        return encode_and_record

    for name in ("image_text_similarity", "matching_features"):
        setattr(module.model, name, recording(name))
    pixels = torch.rand(2, 3, 64, 64)
    batch = {"target_caption": captions, "target_image": pixels, "target_key": torch.arange(2)}
    loss = module._image_text_step(batch, "pixel_values")
    assert torch.isfinite(loss)
    assert read["image_text_similarity"] == ["large red square top left", captions[1]]
    assert read["matching_features"][:2] == captions  # the pairs, then the hard negatives
    with pytest.raises(ConfigError, match="contrastive_clauses is a stage-1 option"):
        CSMCIRModule(contrastive_clauses=1)
    with pytest.raises(ConfigError, match="contrastive_clauses must be 0"):
        CSMCIRModule(objective="image_text", contrastive_clauses=-1)


def test_image_text_matching_needs_a_joint_pass():
    """The CLIP4Cir baseline has no joint image-text pass for a matching head to read."""
    from csmcir.baselines import CLIP4Cir

    module = CSMCIRModule(objective="image_text", image_text_matching=True)
    module.model = CLIP4Cir.from_preset("clip4cir-tiny", ["a red square", "a blue circle"])
    with pytest.raises(ConfigError, match="needs a model with a joint image-text pass"):
        module._build_matching_head()


def test_a_symmetric_loss_is_the_mean_of_both_directions(
    synthcir: Path, captions: Path, tmp_path: Path
):
    run(fit_args(synthcir, captions, tmp_path, "--model.symmetric_loss", "true"))
    rows = read_metrics(tmp_path)
    reverse = series(rows, "train/target_to_query_loss")
    assert sorted(reverse) == list(range(6))
    assert all(math.isfinite(v) and v > 0 for v in reverse.values())
    plain = tmp_path / "plain"
    run(fit_args(synthcir, captions, plain))
    assert not series(read_metrics(plain), "train/target_to_query_loss")
    # the same start and batch: step 0's loss is the mean of the plain loss and the reverse
    first = series(read_metrics(plain), "train/loss")[0]
    both = series(rows, "train/loss")[0]
    assert both == pytest.approx((first + reverse[0]) / 2, rel=1e-5)


def test_fit_uses_every_core_alone_and_its_share_in_a_grid(
    synthcir: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr("csmcir.train.cli.available_cores", lambda: 4)
    # each run stops at the missing captions, after it set and printed its threads
    monkeypatch.setenv(LANES_ENV, "2")
    assert csmcir_cli.main(fit_args(synthcir, None, tmp_path)) == 2
    assert "torch threads: 2 (4 cores shared by 2 runs side by side)" in capsys.readouterr().out
    assert torch.get_num_threads() == 2
    monkeypatch.delenv(LANES_ENV)
    assert csmcir_cli.main(fit_args(synthcir, None, tmp_path)) == 2
    assert "torch threads: 4 (all 4 cores this process may use)" in capsys.readouterr().out
    assert csmcir_cli.main(fit_args(synthcir, None, tmp_path, "--threads", "1")) == 2
    assert "torch threads: 1 (set by --threads)" in capsys.readouterr().out
    assert torch.get_num_threads() == 1
    assert csmcir_cli.main(fit_args(synthcir, None, tmp_path, "--threads", "0")) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_wrong_config_keys_are_named(synthcir: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(fit_args(synthcir, None, tmp_path, "--model.lrr", "1"))
    assert exit_info.value.code == 2
    assert "model.lrr" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(SystemExit):
        run(fit_args(synthcir, None, tmp_path, "--config", str(bad)))
    assert "does not accept option 'data.batch_sise'" in capsys.readouterr().err


class RecordingBank:
    """A stand-in memory bank: one extra negative per query, recorded calls, one statistic."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def extra_negatives(self, **kwargs):
        self.calls.append(kwargs)
        queries = kwargs["queries"]
        return {
            "extra_logits": queries @ queries.T.detach(),
            "extra_mask": ~torch.eye(len(queries), dtype=torch.bool, device=queries.device),
            "stats": {"bank/calls": torch.tensor(float(len(self.calls)))},
        }


def test_the_memory_bank_hook_is_called_every_step(synthcir: Path, captions: Path):
    L.seed_everything(0)
    module = CSMCIRModule(warmup_steps=1)
    module.memory_bank = RecordingBank()
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=BATCH, cache_images=True)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    calls = module.memory_bank.calls
    assert [c["step"] for c in calls] == [0, 1]
    assert calls[0]["queries"].shape == calls[0]["targets"].shape == (BATCH, 64)
    assert calls[0]["in_batch_logits"].shape == (BATCH, BATCH)
    assert calls[0]["target_keys"].shape == calls[0]["reference_keys"].shape == (BATCH,)
    assert trainer.callback_metrics["bank/calls"].item() == 2.0


@pytest.mark.slow
def test_ddp_two_processes_gather_the_batch(synthcir: Path, captions: Path, tmp_path: Path):
    """Two CPU ranks (gloo): each query is scored against both ranks' targets."""
    args = fit_args(synthcir, captions, tmp_path / "run")
    args += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "csmcir", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert set(series(rows, "train/candidates").values()) == {2.0 * BATCH}
    assert sorted(series(rows, "train/loss")) == [0, 1, 2]
    assert len(series(rows, "val/score")) == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["synthcir", "cirr", "fashioniq", "shoes", "fashion200k"])
def test_every_benchmark_config_parses(name: str, capsys):
    """Each YAML names only options that exist (LightningCLI rejects anything else)."""
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", name, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert f"benchmark: {name}" in printed
    assert "preset: tiny" in printed if name == "synthcir" else "preset: blip2-vitg" in printed


def test_checkpoints_of_python_built_runs_load_weights_only(
    synthcir: Path, captions: Path, tmp_path: Path
):
    """Paths given as Path objects (not CLI strings) must not leak into the checkpoint."""
    L.seed_everything(0)
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=BATCH, cache_images=True)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(CSMCIRModule(warmup_steps=1), data)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    checkpoint = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["root"] == str(synthcir)
    model = model_from_checkpoint(tmp_path / "one.ckpt")
    assert model.config.preset == "tiny"


def test_a_truncated_checkpoint_is_named(synthcir: Path, captions: Path, tmp_path: Path, capsys):
    """torch's "PytorchStreamReader failed" alone does not say which file to delete."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:2000])
    named = rf"checkpoint {cut} is unreadable \(.*\): it is cut short"
    with pytest.raises(DataError, match=named):
        model_from_checkpoint(cut)
    with pytest.raises(DataError, match=named):  # what fit's trainer reads checkpoints with
        NamedCheckpointIO().load_checkpoint(cut)
    argv = fit_args(synthcir, captions, tmp_path / "run", "--ckpt_path", str(cut))
    assert csmcir_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {cut} is unreadable" in err and "PytorchStreamReader" in err
    assert "Traceback" not in err


def test_drop_missing_says_what_it_dropped_and_records_it(
    synthcir: Path, captions: Path, tmp_path: Path, capsys
):
    import shutil

    root = tmp_path / "synth"
    shutil.copytree(synthcir, root, ignore=shutil.ignore_patterns("mcot_captions*"))
    train = load_split("synthcir", root, "train")
    val = load_split("synthcir", root, "val")
    gone = [train.queries[0].target, val.queries[0].reference]
    for image_id in gone:
        (train.image_paths.get(image_id) or val.image_paths[image_id]).unlink()
    args = fit_args(root, captions, tmp_path / "run", "--data.drop_missing", "true")
    run([*args, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"])
    err = capsys.readouterr().err
    dropped_train = [  # every query whose reference, target or subset uses the missing image
        q.query_id for q in train.queries if gone[0] in (q.reference, q.target, *q.subset)
    ]
    assert len(dropped_train) > 1
    assert f"synthcir/train: drop_missing dropped {len(dropped_train)} of 64 queries" in err
    assert f"queries: {', '.join(dropped_train[:5])}" in err
    assert "synthcir/val: drop_missing dropped" in err
    for folder in ("model", "best"):
        record = json.loads((tmp_path / "run" / folder / "training.json").read_text())
        assert record["dropped"]["synthcir/train"] == {
            "images": [gone[0]],
            "queries": dropped_train,
        }
        assert record["dropped"]["synthcir/val"]["images"] == [gone[1]]
