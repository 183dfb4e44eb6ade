"""``csmcir ablate``: config checks, the table's arithmetic, the runner's resume and failure rules
(with a stand-in for the subprocesses), and one real few-step grid end to end."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from csmcir import cli as csmcir_cli
from csmcir import quickstart
from csmcir.ablation.config import AblationConfig, flatten, load_config
from csmcir.ablation.runner import Grid, flag_value, log_tail, stale_reason
from csmcir.ablation.table import markdown, summarise
from csmcir.errors import ConfigError
from csmcir.model import CSMCIR
from csmcir.model.config import CSMCIRConfig
from csmcir.packaged import config_file, config_names
from csmcir.train.memory_bank import MemoryBankConfig
from csmcir.train.module import CSMCIRModule
from csmcir.train.resolve import resolve
from csmcir.train.stage_one import NAMES, PRETRAINED


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def fit_yaml(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "fit.yaml",
        {"trainer": {"max_steps": 100, "accumulate_grad_batches": 1}, "data": {"batch_size": 4}},
    )


def base_config(fit_yaml: Path, variants: list[dict], **extra) -> dict:
    return {
        "benchmark": "synthcir",
        "root": str(fit_yaml.parent / "data"),
        "fit_config": str(fit_yaml),
        "budget": {"trainer.max_steps": 5, "data.batch_size": 2},
        "captions": {
            "mcot": {"oracle": {"style": "mcot"}},
            "plain": {"oracle": {"style": "plain"}},
        },
        "eval": {"split": "test", "metrics": ["R@1", "Avg"]},
        "variants": variants,
        **extra,
    }


def load(tmp_path: Path, config: dict) -> AblationConfig:
    return load_config(write_yaml(tmp_path / "ablation.yaml", config))


# -- config -------------------------------------------------------------------------------------


def test_extends_merges_overrides_and_init_from_orders_the_runs(tmp_path, fit_yaml):
    config = load(
        tmp_path,
        base_config(
            fit_yaml,
            [
                {"name": "ft", "extends": "full", "init_from": "base", "label": "fine-tuned"},
                {
                    "name": "full",
                    "label": "everything",
                    "captions": "mcot",
                    "overrides": {"model.bank": {"enabled": True, "size": 64}},
                },
                {
                    "name": "base",
                    "extends": "full",
                    "overrides": {"model.bank": {"enabled": False}},
                },
                {"name": "other", "captions": "plain", "overrides": {"--model.lr": 0.1}},
            ],
        ),
    )
    base = config.variant("base")
    assert base.overrides == {"model.bank": {"enabled": False, "size": 64}}
    assert base.captions == "mcot" and base.label == "" and base.regime() == "from scratch"
    ft = config.variant("ft")
    assert ft.overrides == {"model.bank": {"enabled": True, "size": 64}}
    assert ft.regime() == "fine-tuned from base"
    assert config.variant("other").overrides == {"model.lr": 0.1}  # a leading -- is allowed
    assert [v.name for v in config.run_order()] == ["full", "base", "ft", "other"]
    # asking for the fine-tuned row alone also runs what it starts from
    assert [v.name for v in config.run_order(["ft"])] == ["base", "ft"]
    with pytest.raises(ConfigError, match="--variants: no variant named nope"):
        config.run_order(["nope"])


@pytest.mark.parametrize(
    ("variants", "extra", "message"),
    [
        (
            [{"name": "a", "overrides": {"trainer.max_steps": 9}}],
            {},
            r"variants\.a\.overrides\.trainer\.max_steps changes the equal budget",
        ),
        (
            [{"name": "a", "overrides": {"data.captions": "x.json"}}],
            {},
            r"data\.captions is set by the runner; use captions",
        ),
        (
            [{"name": "a", "init_from": "b"}],
            {},
            r"variants\.a\.init_from: 'b' is no variant, model folder, shipped model "
            r"\(.*synthcir-tiny-stage1\) or hub name",
        ),
        (
            [{"name": "a", "init_from": "b"}, {"name": "b", "init_from": "a"}],
            {},
            r"init_from: a cycle",
        ),
        ([{"name": "a", "extends": "a"}], {}, r"extends: a cycle \(a -> a\)"),
        ([{"name": "a", "captions": "nope"}], {}, r"a\.captions: no caption file named 'nope'"),
        (
            [{"name": "a", "overrides": {"model.bank": {}, "model.bank.size": 3}}],
            {},
            r"model\.bank and model\.bank\.size set the same setting twice",
        ),
        ([{"name": "a"}, {"name": "a"}], {}, r"a second variant named 'a'"),
        (
            [{"name": "a"}],
            {"budget": {"data.batch_size": 2}},
            r"budget must set trainer\.max_steps",
        ),
        (
            [{"name": "a"}],
            {"budget": {"trainer.max_steps": 1, "data.batch_size": 2, "data.root": "x"}},
            r"budget\.data\.root: give it as root",
        ),
        (
            [{"name": "a"}],
            {"overrides": {"trainer.accumulate_grad_batches": 2}},
            r"overrides\.trainer\.accumulate_grad_batches changes the budget key",
        ),
        ([{"name": "a", "tower": "x"}], {}, r"variants\.a\.tower: unknown key"),
        ([{"name": "a"}], {"eval": {"split": "test", "weights": "last"}}, r"eval\.weights must"),
    ],
)
def test_bad_configs_name_the_key_at_fault(tmp_path, fit_yaml, variants, extra, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, base_config(fit_yaml, variants, **extra))


def test_a_fit_config_with_another_budget_is_refused_unless_declared(tmp_path, fit_yaml):
    other = write_yaml(
        tmp_path / "other.yaml",
        {"trainer": {"max_steps": 100, "accumulate_grad_batches": 4}, "data": {"batch_size": 4}},
    )
    row = {"name": "b", "fit_config": str(other)}
    with pytest.raises(ConfigError, match=r"sets trainer\.accumulate_grad_batches to 4"):
        load(tmp_path, base_config(fit_yaml, [row]))
    declared = {**row, "changes_budget": ["trainer.accumulate_grad_batches"]}
    assert load(tmp_path, base_config(fit_yaml, [declared])).variant("b").changes_budget
    # a key the budget pins is the same for every row whatever the fit config says
    pinned = base_config(fit_yaml, [row])
    pinned["budget"]["trainer.accumulate_grad_batches"] = 1
    assert load(tmp_path, pinned).variant("b").fit_config == other


def test_the_baseline_comparison_at_two_budgets_trains_the_same_recipes():
    short, long = (
        load_config(f"ablation/synthcir_vs_clip4cir{suffix}") for suffix in ("_480", "_1200")
    )
    assert short.budget["trainer.max_steps"] == 480 and long.budget["trainer.max_steps"] == 1200
    assert [v.name for v in short.variants] == [v.name for v in long.variants]
    for name in ("csmcir", "csmcir-no-bank", "clip4cir"):
        assert short.variant(name).overrides == long.variant(name).overrides, name
        assert short.variant(name).fit_config == long.variant(name).fit_config, name


def test_the_quickstart_comparison_trains_what_the_quickstart_trains():
    """CSMCIR's row is the quickstart's recipe; the baseline starts from its own stage-1 CLIP."""
    config = load_config("ablation/synthcir_vs_clip4cir")
    csmcir, baseline = config.variant("csmcir"), config.variant("clip4cir")
    assert csmcir.overrides == quickstart.RECIPE
    assert csmcir.init_model == NAMES["tiny"] and baseline.init_model == NAMES["clip4cir-tiny"]
    fit = yaml.safe_load(config_file("synthcir").read_text())
    assert config.budget["trainer.max_steps"] == fit["trainer"]["max_steps"]
    assert baseline.changes_budget == ("trainer.max_steps",)


def test_the_shipped_configs_load_and_cover_the_issue_rows():
    shipped = {n.removeprefix("ablation/") for n in config_names() if n.startswith("ablation/")}
    assert {"synthcir", "synthcir_bank", "fashioniq", "cirr", "synthcir_vs_clip4cir"} <= shipped
    for name in shipped:
        load_config(f"ablation/{name}")
    config = load_config("ablation/synthcir")
    rows = {v.name: v for v in config.variants}
    assert config.seeds == (0, 1, 2, 3, 4) and config.eval.paired == ("R@1", "Rsubset@1", "Avg")
    # full is the method as defined: its entropy window is pinned (the default is fixed)
    method = {"open_entropy": 0.2, "window": "entropy"}
    assert rows["full"].overrides["model.bank"] == {"enabled": True, **method}
    assert rows["no-bank"].overrides["model.bank"] == {"enabled": False, **method}
    assert rows["tower-separate"].overrides["model.model_options"] == {"tower": "separate"}
    assert rows["target-image-only"].overrides["model.model_options"] == {"target_text": "none"}
    assert config.captions["noisy-mcot"].oracle == {"style": "mcot", "noise": 0.3, "seed": 0}
    assert config.captions["plain"].oracle == {"style": "plain"}
    # each part is removed from the full model, with its MCoT captions unless they are the part;
    # image-only targets are token-level, which the bank does not take: that row leaves no-bank
    for name in ("no-bank", "tower-separate", "plain-captions", "noisy-mcot"):
        assert rows[name].compare_to == "full", name
    for name in ("tower-separate", "plain-captions", "noisy-mcot"):
        assert rows[name].overrides["model.bank"]["enabled"], name
    assert rows["target-image-only"].compare_to == "no-bank"
    assert not rows["target-image-only"].overrides["model.bank"]["enabled"]
    assert rows["tower-separate"].captions == "mcot" and rows["target-image-only"].captions is None

    # the bank's own grid shares the main grid's cells: its full and no-bank are the same runs
    bank = load_config("ablation/synthcir_bank")
    assert bank.out == config.out and bank.table != config.table
    assert bank.budget == config.budget and bank.overrides == config.overrides
    assert bank.captions["mcot"] == config.captions["mcot"]
    for name in ("full", "no-bank"):
        mine, theirs = bank.variant(name), config.variant(name)
        assert (mine.overrides, mine.captions) == (theirs.overrides, theirs.captions), name
    parts = {v.name: v.overrides["model.bank"] for v in bank.variants}
    assert parts["gate-off"]["open_entropy"] is None and parts["offset-off"]["logit_offset"] == 0
    assert parts["window-fixed"]["window"] == "fixed"
    assert parts["select-entropy"]["selection"] == "entropy"
    assert parts["reference-kept"]["exclude_reference"] is False
    # batch 32 and 128 see the samples of the grid's 1,200 steps of 64
    samples = config.budget["trainer.max_steps"] * config.budget["data.batch_size"]
    for name in ("b32", "b32-no-bank", "b128", "b128-no-bank"):
        v = bank.variant(name)
        assert v.overrides["trainer.max_steps"] * v.overrides["data.batch_size"] == samples

    # the budget check reuses the grid's full runs and varies nothing but the step count
    budget = load_config("ablation/synthcir_budget")
    assert budget.out == config.out and budget.table not in (config.table, bank.table)
    assert (budget.budget, budget.overrides) == (config.budget, config.overrides)
    full = config.variant("full")
    assert (budget.variant("full").overrides, budget.variant("full").captions) == (
        full.overrides,
        full.captions,
    )
    for name, steps in (("full-600", 600), ("full-2400", 2400)):
        v = budget.variant(name)
        assert v.overrides == {
            **full.overrides,
            "trainer.max_steps": steps,
            "trainer.val_check_interval": steps,
        }, name


def test_a_mapping_override_merges_into_the_fit_configs_mapping(tmp_path):
    fit = write_yaml(
        tmp_path / "fit.yaml",
        {"model": {"model_options": {"precision": "bf16"}, "lr": 1.0}, "data": {"batch_size": 4}},
    )
    config = base_config(
        fit,
        [
            {"name": "a", "overrides": {"model.model_options": {"tower": "separate"}}},
            {"name": "b", "overrides": {"model.bank": {"selection": "random"}}},
        ],
    )
    config["overrides"] = {"model.bank": {"enabled": True, "size": 8}, "model.lr": 0.5}
    grid = Grid(load(tmp_path, config), tmp_path / "out", [3])
    a, b = grid.cells()

    def flags(cell):
        argv = grid.fit_argv(cell, None, None)
        return {k: argv[i + 1] for i, k in enumerate(argv) if k.startswith("--")}

    assert json.loads(flags(a)["--model.model_options"]) == {
        "precision": "bf16",
        "tower": "separate",
    }
    assert json.loads(flags(a)["--model.bank"]) == {"enabled": True, "size": 8}
    bank = {"enabled": True, "size": 8, "selection": "random"}
    assert json.loads(flags(b)["--model.bank"]) == bank
    assert "--model.model_options" not in flags(b)
    assert flags(b)["--model.lr"] == "0.5"
    assert flags(b)["--seed_everything"] == "3" and flags(b)["--data.seed"] == "3"
    assert flags(b)["--data.captions"] == "null"
    config["variants"] = [{"name": "c", "overrides": {"model.bank.size": 4}}]
    with pytest.raises(ConfigError, match=r"model\.bank and model\.bank\.size set the same"):
        load(tmp_path, config)


def test_flag_values_read_back_as_the_yaml_values():
    assert flag_value(True) == "true" and flag_value(None) == "null" and flag_value(0.3) == "0.3"
    nested = {"enabled": True, "selection": "random", "max_share": None}
    assert json.loads(flag_value(nested)) == nested


def test_log_tail_keeps_the_last_lines_without_progress_redraws(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("a\n\nstep 1\rstep 2\rstep 3\nerror: bad value\n", encoding="utf-8")
    assert log_tail(log, 2) == ["step 3", "error: bad value"]
    assert log_tail(tmp_path / "absent.txt") == []


# -- table --------------------------------------------------------------------------------------


def ok_record(variant: str, seed: int, r1: float, avg: float, steps: int = 5) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "status": "ok",
        "train_s": 10.0 * (seed + 1),
        "metrics": {"R@1": r1, "Avg": avg},
        "budget": {"trainer.max_steps": steps, "data.batch_size": 2},
    }


def failed_record(variant: str, seed: int, error: str) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "status": "failed",
        "stage": "train",
        "error": [error],
    }


def test_table_gives_mean_and_sample_std_and_lists_failures(tmp_path, fit_yaml):
    config = load(
        tmp_path,
        base_config(
            fit_yaml,
            [
                {"name": "a", "label": "row | a"},
                {"name": "b"},
                {"name": "c"},
                {"name": "d", "changes_budget": ["trainer.max_steps"]},
            ],
        ),
    )
    records = [
        ok_record("a", 0, 10.0, 1.0),
        ok_record("a", 1, 20.0, 2.0),
        ok_record("a", 2, 30.0, 6.0),
        ok_record("b", 0, 40.0, 4.0),
        failed_record("b", 1, "error: tower must be shared or separate"),
        failed_record("c", 0, "boom"),
        ok_record("d", 0, 50.0, 5.0, steps=9),
    ]
    table = summarise(config, config.variants, [0, 1, 2], records)
    a, b, c, d = table["rows"]
    assert a["metrics"]["R@1"]["mean"] == 20.0 and a["metrics"]["R@1"]["std"] == 10.0
    assert a["metrics"]["Avg"]["mean"] == 3.0 and a["metrics"]["Avg"]["std"] == pytest.approx(
        (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5
    )
    assert a["train_s_mean"] == 20.0 and a["status"] == "ok"
    assert b["status"] == "partial" and b["seeds_ok"] == [0]
    assert b["metrics"]["R@1"] == {"mean": 40.0, "std": None, "values": {"0": 40.0}}
    error = "error: tower must be shared or separate"
    assert b["seeds_failed"] == {"1": {"stage": "train", "error": error}}
    assert c["status"] == "failed" and c["metrics"]["R@1"]["mean"] is None
    assert d["budget_changes"] == {"trainer.max_steps": 9} and d["unequal_budget"] == {}

    text = markdown(table, "csmcir ablate --config x.yaml", "test machine")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| variant"))
    assert header == "| variant | what | regime | seeds ok | R@1 | Avg | train s | notes |"
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert len(rows) == 4 and all(r.count(" | ") == header.count(" | ") for r in rows)
    assert rows[0].startswith("| a | row \\| a | from scratch | 3/3 | 20.0 ± 10.0 | 3.0 ± 2.6 |")
    assert "| 1/2 | 40.0 | 4.0 |" in rows[1]
    assert "seed 1 failed (train): error: tower must be shared or separate" in rows[1]
    assert "| 0/1 | failed | failed |" in rows[2] and "seed 0 failed (train): boom" in rows[2]
    assert "budget changed: trainer.max_steps=9" in rows[3]
    assert "Command: `csmcir ablate --config x.yaml`" in text and "test machine" in text


def test_paired_differences_subtract_the_same_seed_and_count_signs(tmp_path, fit_yaml):
    rows = [
        {"name": "base"},
        {"name": "worse", "compare_to": "base"},
        {"name": "better", "extends": "worse", "compare_to": "base"},
        {"name": "lonely", "compare_to": "base"},
        {"name": "plain", "extends": "worse"},  # compare_to is the row's own, not inherited
    ]
    config = load(tmp_path, base_config(fit_yaml, rows))
    assert config.variant("plain").compare_to is None
    records = [
        ok_record("base", 0, 0.0, 50.0),
        ok_record("base", 1, 0.0, 10.0),
        ok_record("base", 2, 0.0, 30.0),
        ok_record("worse", 0, 0.0, 47.0),  # -3
        ok_record("worse", 1, 0.0, 9.0),  # -1
        failed_record("worse", 2, "boom"),
        ok_record("better", 0, 0.0, 52.0),  # +2
        ok_record("better", 1, 0.0, 13.0),  # +3
        ok_record("better", 2, 0.0, 29.0),  # -1
        failed_record("lonely", 0, "boom"),
        ok_record("plain", 0, 0.0, 1.0),
    ]
    table = summarise(config, config.variants, [0, 1, 2], records)
    base, worse, better, lonely, plain = table["rows"]
    assert base["paired"] is None and plain["paired"] is None
    (lonely_avg,) = lonely["paired"]
    assert lonely_avg["mean"] is None and lonely_avg["values"] == {}
    (worse_avg,) = worse["paired"]
    assert worse_avg["metric"] == "Avg" and worse_avg["against"] == "base"
    assert worse_avg["values"] == {"0": -3.0, "1": -1.0}  # seed 2 failed: not paired
    assert worse_avg["mean"] == -2.0 and worse_avg["std"] == pytest.approx(2**0.5)
    assert (worse_avg["lower"], worse_avg["higher"]) == (2, 0)
    (better_avg,) = better["paired"]
    assert better_avg["mean"] == pytest.approx(4 / 3) and better_avg["higher"] == 2
    text = markdown(table, "c", "m")
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert "| Avg | paired with | Δ Avg | train s |" in header
    assert "| base | -2.0 ± 1.4 (2 of 2 lower) |" in text
    assert "| base | 1.3 ± 2.1 (2 of 3 higher) |" in text
    assert "| base | no seed of both rows finished |" in text
    # and seed by seed, a blank where a seed of either row did not finish, with the mean's
    # Student-t 95% interval (t 0.975 at 1 and 2 degrees of freedom: 12.706 and 4.303)
    assert "| worse | base | Avg | -3.0 | -1.0 |  | -2.0 | -14.7 to +10.7 |" in text
    assert "| better | base | Avg | +2.0 | +3.0 | -1.0 | +1.3 | -3.8 to +6.5 |" in text
    assert worse_avg["ci95"] == pytest.approx([-2 - 12.7062, -2 + 12.7062], abs=1e-3)
    assert better_avg["ci95"] == pytest.approx([4 / 3 - 5.1721, 4 / 3 + 5.1721], abs=1e-3)
    # the paired row was not run at all (--variants without it)
    alone = summarise(config, [config.variant("worse")], [0], [ok_record("worse", 0, 0.0, 1.0)])
    assert "its compare_to row was not run" in markdown(alone, "c", "m")
    with pytest.raises(ConfigError, match=r"variants\.a\.compare_to: no other variant named 'a'"):
        load(tmp_path, base_config(fit_yaml, [{"name": "a", "compare_to": "a"}]))
    with pytest.raises(ConfigError, match=r"eval\.paired: 'R@5' is not one of the metrics"):
        bad = base_config(fit_yaml, rows)
        bad["eval"]["paired"] = ["Avg", "R@5"]
        load(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"eval\.paired must be a metric or a list of metrics"):
        bad["eval"]["paired"] = {"Avg": 1}
        load(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"table must be a file name stem"):
        load(tmp_path, {**base_config(fit_yaml, rows), "table": "../elsewhere"})


def test_several_paired_metrics_give_one_column_each(tmp_path, fit_yaml):
    raw = base_config(fit_yaml, [{"name": "base"}, {"name": "other", "compare_to": "base"}])
    raw["eval"]["paired"] = ["R@1", "Avg"]
    config = load(tmp_path, raw)
    assert config.eval.paired == ("R@1", "Avg")
    records = [
        ok_record("base", 0, 10.0, 50.0),
        ok_record("base", 1, 20.0, 10.0),
        ok_record("other", 0, 14.0, 47.0),  # R@1 +4, Avg -3
        ok_record("other", 1, 22.0, 9.0),  # R@1 +2, Avg -1
    ]
    table = summarise(config, config.variants, [0, 1], records)
    r1, avg = table["rows"][1]["paired"]
    assert (r1["metric"], r1["values"], r1["higher"]) == ("R@1", {"0": 4.0, "1": 2.0}, 2)
    assert (avg["metric"], avg["values"], avg["lower"]) == ("Avg", {"0": -3.0, "1": -1.0}, 2)
    text = markdown(table, "c", "m")
    assert "| Avg | paired with | Δ R@1 | Δ Avg | train s |" in text
    assert "| base | 3.0 ± 1.4 (2 of 2 higher) | -2.0 ± 1.4 (2 of 2 lower) |" in text
    assert "| other | base | R@1 | +4.0 | +2.0 | +3.0 |" in text
    assert "| other | base | Avg | -3.0 | -1.0 | -2.0 |" in text


def test_a_run_with_an_undeclared_budget_difference_is_flagged(tmp_path, fit_yaml):
    config = load(tmp_path, base_config(fit_yaml, [{"name": "a"}, {"name": "b"}]))
    records = [ok_record("a", 0, 1.0, 1.0), ok_record("b", 0, 1.0, 1.0, steps=7)]
    table = summarise(config, config.variants, [0], records)
    assert table["rows"][1]["unequal_budget"] == {"trainer.max_steps": 7}
    assert "UNEQUAL BUDGET: trainer.max_steps=7" in markdown(table, "c", "m")


# -- the runner, with a stand-in for the subprocesses ------------------------------------------


class FakeRuns:
    """Plays ``csmcir caption|fit|eval``: writes the files they write; fails where told."""

    def __init__(self, fail_when: str = "0.777", steps_short: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail_when = fail_when
        self.steps_short = steps_short

    def __call__(self, argv: list[str], log: Path, timeout: float | None) -> tuple[int, float]:
        self.calls.append(argv)
        log.parent.mkdir(parents=True, exist_ok=True)
        args = dict(itertools.pairwise(argv))
        verb = argv[3]
        if self.fail_when in " ".join(argv):
            log.write_text(f"$ {' '.join(argv)}\nerror: bad value {self.fail_when}\n")
            return 2, 0.5
        if verb == "caption" and argv[4] == "merge":
            Path(args["--out"]).write_text(json.dumps({"img": "a caption"}))
        elif verb == "fit":
            run = Path(args["--trainer.default_root_dir"])
            steps = int(args["--trainer.max_steps"])
            saved = {"trainer": {"max_steps": steps}, "data": {"batch_size": 2}}
            (run / "logs" / "version_0").mkdir(parents=True)
            (run / "logs" / "version_0" / "config.yaml").write_text(yaml.safe_dump(saved))
            (run / "model").mkdir()
            done = steps - 1 if self.steps_short else steps
            weights = " ".join(argv)  # stands for the trained weights: other flags, other weights
            record = {"global_step": done, "weights": weights}
            (run / "model" / "training.json").write_text(json.dumps(record))
            (run / "last.ckpt").write_bytes(b"x")
        elif verb == "eval":
            weights = json.loads((Path(args["--model"]) / "training.json").read_text())["weights"]
            metrics = {"synthcir": {"R@1": 10.0 + len(weights) % 7, "Avg": 5.0}}
            Path(args["--out"]).write_text(
                json.dumps({"metrics": metrics, "model": {"fingerprint": weights}})
            )
        return 0, 1.0


def fake_grid(tmp_path, fit_yaml, runs, rows: list[dict], **kwargs) -> Grid:
    """A grid whose runs ``runs`` plays; fit commands resolve in this process (the real parser
    and defaults, without the subprocess's start-up)."""
    config = load(tmp_path, base_config(fit_yaml, rows))
    return Grid(config, tmp_path / "out", [0, 1], run=runs, resolve=resolve, **kwargs)


VARIANTS = [
    {"name": "base", "captions": "mcot"},
    {"name": "ft", "extends": "base", "init_from": "base", "overrides": {"model.lr": 0.01}},
    {"name": "bad", "overrides": {"model.lr": 0.777}},  # valid, but FakeRuns fails it
]


def test_a_row_fine_tunes_a_shipped_model_on_every_seed(tmp_path, fit_yaml):
    """``init_from: <shipped model>`` starts each seed from that model, keyed by its weights."""
    runs = FakeRuns()
    rows = [{"name": "start", "captions": "mcot", "init_from": "synthcir-tiny-stage1"}]
    grid = fake_grid(tmp_path, fit_yaml, runs, rows)
    variant = grid.config.variant("start")
    assert (variant.init_from, variant.init_model) == (None, "synthcir-tiny-stage1")
    assert variant.regime() == "fine-tuned from synthcir-tiny-stage1"
    records = grid.run_all()
    assert [r["status"] for r in records] == ["ok", "ok"]
    shipped = str(PRETRAINED / "synthcir-tiny-stage1")
    fits = [c for c in runs.calls if c[3] == "fit"]
    assert [c[c.index("--model.init_from") + 1] for c in fits] == [shipped, shipped]
    cell = grid.cells()[0]
    assert grid.starting_weights(cell)[1] == CSMCIR.from_pretrained(shipped).fingerprint()
    # a dry run keys the cells by the model's weights too, so it sees they would be reused
    assert [reason for *_, reason in grid.plan()] == [None, None]


def test_runner_records_runs_failures_and_resumes(tmp_path, fit_yaml):
    runs = FakeRuns()
    grid = fake_grid(tmp_path, fit_yaml, runs, VARIANTS)
    records = grid.run_all()
    status = {(r["variant"], r["seed"]): r["status"] for r in records}
    assert status == {
        ("base", 0): "ok",
        ("ft", 0): "ok",
        ("bad", 0): "failed",
        ("base", 1): "ok",
        ("ft", 1): "ok",
        ("bad", 1): "failed",
    }
    bad = next(r for r in records if r["variant"] == "bad")
    assert bad["stage"] == "train" and bad["error"][-1] == "error: bad value 0.777"
    assert Path(bad["log"]).is_file()
    # the captions were built once, then shared
    assert sum(c[3:5] == ["caption", "run"] for c in runs.calls) == 1
    # the fine-tuned run started from the same seed's base weights
    ft_fit = next(c for c in runs.calls if c[3] == "fit" and "/ft/seed1/" in " ".join(c))
    assert ft_fit[ft_fit.index("--model.init_from") + 1].endswith("cells/base/seed1/run/model")
    assert ft_fit[ft_fit.index("--seed_everything") + 1] == "1"
    # checkpoints of finished runs are removed, the exported weights stay
    assert not list((tmp_path / "out" / "cells" / "base" / "seed0" / "run").glob("*.ckpt"))

    # a rerun skips the finished cells and retries the failed ones
    runs.calls.clear()
    grid.run_all()
    assert {c[3] for c in runs.calls} == {"fit"}
    assert all("0.777" in " ".join(c) for c in runs.calls) and len(runs.calls) == 2
    # a changed command reruns the cell, and whatever started from its weights
    changed = [dict(v) for v in VARIANTS]
    changed[0]["overrides"] = {"model.lr": 0.5}
    runs.calls.clear()
    fake_grid(tmp_path, fit_yaml, runs, changed, variants=["ft"]).run_all()
    trained = sorted(
        c[c.index("--trainer.default_root_dir") + 1] for c in runs.calls if c[3] == "fit"
    )
    assert [Path(t).parts[-3:-1] for t in trained] == [
        ("base", "seed0"),
        ("base", "seed1"),
        ("ft", "seed0"),
        ("ft", "seed1"),
    ]
    # --force reruns everything asked for
    runs.calls.clear()
    fake_grid(tmp_path, fit_yaml, runs, changed, variants=["base"], force=True).run_all()
    assert sum(c[3] == "fit" for c in runs.calls) == 2


class SideBySide(FakeRuns):
    """Each fit waits for a second fit to start beside it: run one at a time, it would fail."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=30)

    def __call__(self, argv: list[str], log: Path, timeout: float | None) -> tuple[int, float]:
        if argv[3] == "fit":
            self.barrier.wait()
        return super().__call__(argv, log, timeout)


def test_lanes_run_cells_side_by_side_after_the_cells_they_start_from(tmp_path, fit_yaml):
    runs = SideBySide()
    grid = fake_grid(tmp_path, fit_yaml, runs, VARIANTS[:2])
    assert [[c.key for c in wave] for wave in grid.waves(grid.cells())] == [
        ["base/seed0", "base/seed1"],
        ["ft/seed0", "ft/seed1"],
    ]
    records = grid.run_all(lanes=2)
    assert [(r["variant"], r["seed"], r["status"]) for r in records] == [
        ("base", 0, "ok"),
        ("ft", 0, "ok"),
        ("base", 1, "ok"),
        ("ft", 1, "ok"),
    ]
    fits = [c[c.index("--trainer.default_root_dir") + 1] for c in runs.calls if c[3] == "fit"]
    assert sorted(Path(f).parts[-3] for f in fits[:2]) == ["base", "base"]


def test_a_failed_start_fails_the_runs_that_fine_tune_from_it(tmp_path, fit_yaml):
    runs = FakeRuns(fail_when="--model.lr 0.3")
    variants = [dict(VARIANTS[0], overrides={"model.lr": 0.3}), VARIANTS[1]]
    records = fake_grid(tmp_path, fit_yaml, runs, variants).run_all()
    ft = [r for r in records if r["variant"] == "ft"]
    assert [r["status"] for r in ft] == ["failed", "failed"]
    assert ft[0]["stage"] == "init_from"
    assert ft[0]["error"] == ["its starting run base/seed0 failed"]


def test_a_run_that_stops_short_of_the_budget_is_a_failure(tmp_path, fit_yaml):
    records = fake_grid(tmp_path, fit_yaml, FakeRuns(steps_short=True), VARIANTS[:1]).run_all()
    assert records[0]["status"] == "failed"
    assert records[0]["error"] == ["training stopped at step 4 of 5: not the equal budget"]


def test_a_missing_caption_file_fails_its_rows_only(tmp_path, fit_yaml):
    config = base_config(fit_yaml, [{"name": "a", "captions": "given"}, {"name": "b"}])
    config["captions"] = {"given": {"file": str(tmp_path / "absent.json")}}
    grid = Grid(load(tmp_path, config), tmp_path / "out", [0], run=FakeRuns(), resolve=resolve)
    a, b = grid.run_all()
    assert a["status"] == "failed" and a["stage"] == "captions"
    assert a["error"] == [f"caption file 'given' not found: {tmp_path / 'absent.json'}"]
    assert b["status"] == "ok"


# -- staleness: a cell's key is its resolved config, not its commands ---------------------------


BANK_ROWS = [
    {"name": "bank", "overrides": {"model.bank": {"enabled": True}}},
    {"name": "no-bank", "overrides": {"model.bank": {"enabled": False}}},
    {"name": "lr", "overrides": {"model.lr": 0.002}},
]


@dataclasses.dataclass
class ChangedBank(MemoryBankConfig):
    """MemoryBankConfig after the code changed a default (at module level: the fit parser finds
    the class by its import path)."""

    open_entropy: float | None = 0.3


def trained(runs: FakeRuns) -> list[str]:
    """The cells a grid trained, as ``variant/seedN``."""
    folders = [c[c.index("--trainer.default_root_dir") + 1] for c in runs.calls if c[3] == "fit"]
    return sorted("/".join(Path(f).parts[-3:-1]) for f in folders)


def rerun(tmp_path, fit_yaml, rows=BANK_ROWS) -> tuple[FakeRuns, list[str]]:
    """Run the grid again; what it trained and the reasons it gave."""
    runs, said = FakeRuns(), []
    grid = fake_grid(tmp_path, fit_yaml, runs, rows)
    for cell in grid.cells():
        grid.run_cell(cell, said.append)
    return runs, said


def test_a_changed_memory_bank_default_reruns_the_bank_rows_only(tmp_path, fit_yaml, monkeypatch):
    fake_grid(tmp_path, fit_yaml, FakeRuns(), BANK_ROWS).run_all()
    runs, said = rerun(tmp_path, fit_yaml)
    assert runs.calls == [] and said == []  # nothing changed: every cell is reused

    # The code changes a bank default (its rows give the bank as a mapping, without that key).
    # A disabled bank builds nothing, so its row is not affected.
    monkeypatch.setattr("csmcir.train.module.MemoryBankConfig", ChangedBank)
    runs, said = rerun(tmp_path, fit_yaml)
    assert trained(runs) == ["bank/seed0", "bank/seed1"]
    assert said == [
        f"bank/seed{s}: runs again: fit config changed: model.bank.open_entropy 0.2 -> 0.3"
        for s in (0, 1)
    ]
    record = json.loads((tmp_path / "out/cells/bank/seed0/result.json").read_text())
    assert record["key"]["fit"]["model.bank.open_entropy"] == 0.3
    assert record["key"]["fit"]["model.bank.selection"] == "hardest"  # every bank setting
    assert record["key"]["model"]["qformer.hidden_size"] == 64  # the tiny preset's model config
    assert rerun(tmp_path, fit_yaml)[0].calls == []


def test_a_changed_module_default_or_fit_yaml_value_reruns_the_rows_that_use_it(
    tmp_path, fit_yaml, monkeypatch
):
    fake_grid(tmp_path, fit_yaml, FakeRuns(), BANK_ROWS).run_all()
    # model.lr's default changes in the code: the row that sets its own lr is not affected
    init = CSMCIRModule.__init__
    names = list(inspect.signature(init).parameters)[1:]  # every one has a default
    defaults = [2e-3 if n == "lr" else d for n, d in zip(names, init.__defaults__, strict=True)]
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    runs, said = rerun(tmp_path, fit_yaml)
    assert trained(runs) == ["bank/seed0", "bank/seed1", "no-bank/seed0", "no-bank/seed1"]
    assert said[0] == "bank/seed0: runs again: fit config changed: model.lr 0.0005 -> 0.002"
    # a value edited in the fit YAML (same path, so the same commands) reruns every row
    fit = yaml.safe_load(fit_yaml.read_text())
    write_yaml(fit_yaml, {**fit, "model": {"weight_decay": 0.1}})
    runs, said = rerun(tmp_path, fit_yaml)
    assert len(trained(runs)) == 6
    assert said[-1] == "lr/seed1: runs again: fit config changed: model.weight_decay 0.05 -> 0.1"


def test_a_changed_model_config_default_reruns_the_rows_built_from_a_preset(
    tmp_path, fit_yaml, monkeypatch
):
    rows = [{"name": "tiny"}, {"name": "clip", "overrides": {"model.preset": "clip4cir-tiny"}}]
    fake_grid(tmp_path, fit_yaml, FakeRuns(), rows).run_all()
    init = CSMCIRConfig.__init__  # the tiny preset's config class; clip4cir has its own
    names = list(inspect.signature(init).parameters)[-len(init.__defaults__) :]
    defaults = [
        True if n == "gradient_checkpointing" else d
        for n, d in zip(names, init.__defaults__, strict=True)
    ]
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))
    runs, said = rerun(tmp_path, fit_yaml, rows)
    assert trained(runs) == ["tiny/seed0", "tiny/seed1"]
    assert (
        said[0]
        == "tiny/seed0: runs again: model config changed: gradient_checkpointing false -> true"
    )


def test_a_setting_added_since_a_cell_ran_reruns_it_only_off_its_default(tmp_path, fit_yaml):
    """A cell recorded before csmcir had a setting lacks it in its key: at its default the
    setting changes nothing (the cell is reused), set to another value it reruns the cell."""
    fake_grid(tmp_path, fit_yaml, FakeRuns(), BANK_ROWS).run_all()
    for path in (tmp_path / "out/cells").glob("*/seed*/result.json"):  # keys from older csmcir
        record = json.loads(path.read_text())
        for part, setting in (("fit", "data.caption_clauses"), ("model", "tower")):
            if record["key"][part] is not None:
                del record["key"][part][setting]
        record["key"]["fit"].pop("model.bank.open_entropy", None)  # a bank's, where it has one
        path.write_text(json.dumps(record))
    runs, said = rerun(tmp_path, fit_yaml)
    assert runs.calls == [] and said == []
    clauses = {**BANK_ROWS[1]["overrides"], "data.caption_clauses": 1}
    rows = [BANK_ROWS[0], {**BANK_ROWS[1], "overrides": clauses}, BANK_ROWS[2]]
    runs, said = rerun(tmp_path, fit_yaml, rows)
    assert trained(runs) == ["no-bank/seed0", "no-bank/seed1"]
    assert said[0] == (
        "no-bank/seed0: runs again: fit config changed: data.caption_clauses (absent) -> 1"
    )


def test_cells_recorded_by_the_old_key_run_again_and_say_why(tmp_path, fit_yaml):
    fake_grid(tmp_path, fit_yaml, FakeRuns(), BANK_ROWS[:1]).run_all()
    path = tmp_path / "out/cells/bank/seed0/result.json"
    record = json.loads(path.read_text())
    del record["key"]
    path.write_text(json.dumps({**record, "spec": "0123456789abcdef"}))  # the old format
    runs, said = rerun(tmp_path, fit_yaml, BANK_ROWS[:1])
    assert trained(runs) == ["bank/seed0"]
    assert said == [
        "bank/seed0: runs again: recorded by an older csmcir ablate, whose key held the "
        "commands only, not the resolved config"
    ]


def test_the_key_holds_the_version_eval_captions_and_starting_weights(tmp_path, fit_yaml):
    key = {
        "csmcir": "0.1.0",
        "fit": {"model.lr": 0.001, "model.bank": None},
        "model": {"tower": "shared"},
        "eval": ["eval", "--split", "test"],
        "captions": "aa",
        "init_from": "ff",
    }
    ok = {"status": "ok", "key": key}
    assert stale_reason(ok, key, force=False) is None
    assert stale_reason(ok, key, force=True) == "--force"
    assert stale_reason(None, key, force=False) == "no earlier run"
    assert stale_reason({"status": "failed", "stage": "eval"}, key, False) == (
        "its earlier run failed (eval)"
    )
    new = {
        **key,
        "csmcir": "0.2.0",
        "fit": {"model.lr": 0.002, "model.bank.enabled": True, "model.bank.size": 8, "a.b": 1},
        "model": {"tower": "separate"},
        "eval": ["eval", "--split", "val"],
        "captions": "bb",
        "init_from": "ee",
    }
    assert stale_reason(ok, new, force=False) == (
        "csmcir version changed: 0.1.0 -> 0.2.0; fit config changed: a.b (absent) -> 1, "
        "model.bank null -> (absent), model.bank.enabled (absent) -> true and 2 more; "
        'model config changed: tower "shared" -> "separate"; eval command changed; '
        "caption file content changed; starting weights changed"
    )


def test_an_invalid_fit_setting_fails_its_rows_before_anything_runs(tmp_path, fit_yaml):
    rows = [
        {"name": "ok"},
        {"name": "tower", "overrides": {"model.model_options": {"tower": "sideways"}}},
        {"name": "typo", "overrides": {"model.bank": {"enabld": True}}},
    ]
    runs = FakeRuns()
    records = fake_grid(tmp_path, fit_yaml, runs, rows).run_all()
    assert trained(runs) == ["ok/seed0", "ok/seed1"]
    failed = {r["variant"]: r for r in records if r["status"] == "failed"}
    assert failed["tower"]["stage"] == "config"
    assert failed["tower"]["error"] == [
        "model config: tower must be one of shared, separate; got 'sideways'"
    ]
    assert failed["typo"]["stage"] == "config"
    assert failed["typo"]["error"][0].startswith('csmcir fit: Parser key "model.bank":')
    assert "Option 'enabld' is not accepted" in failed["typo"]["error"][0]


def test_a_dry_run_says_which_cells_would_run_and_why(tmp_path, fit_yaml):
    rows = [
        {"name": "base", "captions": "mcot"},
        {"name": "ft", "extends": "base", "init_from": "base", "overrides": {"model.lr": 0.01}},
        {"name": "other"},
        {"name": "bad", "overrides": {"model.model_options": {"tower": "sideways"}}},
    ]
    grid = fake_grid(tmp_path, fit_yaml, FakeRuns(), rows, variants=["ft", "other"])
    reasons = {cell.key: reason for cell, _, _, reason in grid.plan()}
    assert reasons == {
        "base/seed0": "its caption file is built first",
        "ft/seed0": "its starting run base/seed0 runs first",
        "other/seed0": "no earlier run",
        "base/seed1": "its caption file is built first",
        "ft/seed1": "its starting run base/seed1 runs first",
        "other/seed1": "no earlier run",
    }
    grid.run_all()
    rows[2]["overrides"] = {"model.lr": 0.5}
    grid = fake_grid(tmp_path, fit_yaml, FakeRuns(), rows)
    reasons = {cell.key: reason for cell, _, _, reason in grid.plan()}
    assert reasons["base/seed0"] is None and reasons["ft/seed1"] is None
    assert reasons["other/seed0"] == "fit config changed: model.lr 0.0005 -> 0.5"
    assert reasons["bad/seed0"] == (
        "INVALID: model config: tower must be one of shared, separate; got 'sideways'"
    )


@pytest.mark.parametrize("name", ["fashioniq", "cirr"])
def test_the_real_data_grids_pass_a_dry_run(name, tmp_path, monkeypatch, capsys):
    """Every row of the shipped FashionIQ and CIRR grids is a valid ``csmcir fit`` (resolved by
    the real parser and presets, in the subprocess a grid uses), before any data is there."""
    monkeypatch.chdir(tmp_path)  # its fit config is a packaged name: found from any folder
    raw = yaml.safe_load(config_file(f"ablation/{name}").read_text())
    (tmp_path / "data").mkdir()
    grid = write_yaml(tmp_path / "grid.yaml", {**raw, "root": str(tmp_path / "data")})
    argv = ["ablate", "--config", str(grid), "--seeds", "0", "--out", str(tmp_path / "out")]
    assert csmcir_cli.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if line.startswith("# ")]
    assert [h.split("/seed0")[0] for h in heads] == [f"# {v['name']}" for v in raw["variants"]]
    assert not any("INVALID" in h for h in heads)
    assert sum(" -m csmcir fit --config " in line for line in lines) == len(raw["variants"])


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_synthcir(tmp_path_factory) -> Path:
    from csmcir.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synthcir")
    generate(root, SynthConfig(train_refs=16, val_refs=4, test_refs=4, image_size=32))
    return root


@pytest.mark.slow
def test_ablate_runs_a_grid_and_reports_the_failing_rows(tiny_synthcir, tmp_path, capsys):
    config = {
        "benchmark": "synthcir",
        "root": str(tiny_synthcir),
        "fit_config": "synthcir",
        "budget": {"trainer.max_steps": 2, "data.batch_size": 8},
        "overrides": {
            "data.val_batch_size": 64,
            "trainer.val_check_interval": 2,
            "trainer.num_sanity_val_steps": 0,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "checkpoint_every": 0,
            "model.warmup_steps": 1,
        },
        "captions": {"mcot": {"oracle": {"style": "mcot"}}},
        "eval": {"split": "test", "metrics": ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Avg"]},
        "variants": [
            {"name": "full", "label": "the tiny model", "captions": "mcot"},
            {  # a valid command whose run fails: the module refuses the value
                "name": "broken",
                "extends": "full",
                "overrides": {"model.temperature": 5.0},
            },
            {  # an invalid command: fails before anything runs
                "name": "invalid",
                "extends": "full",
                "overrides": {"model.model_options": {"tower": "sideways"}},
            },
        ],
    }
    path = write_yaml(tmp_path / "grid.yaml", config)
    out = tmp_path / "out"
    argv = ["ablate", "--config", str(path), "--seeds", "0", "--out", str(out)]
    assert csmcir_cli.main(argv) == 1  # a failed run makes the exit status 1

    table = json.loads((out / "ablation.json").read_text())
    assert table["seeds"] == [0] and table["metrics"] == config["eval"]["metrics"]
    full, broken, invalid = table["rows"]
    assert full["variant"] == "full" and full["status"] == "ok" and full["seeds_ok"] == [0]
    for spread in full["metrics"].values():
        assert 0.0 <= spread["mean"] <= 100.0 and spread["std"] is None
    assert broken["status"] == "failed" and broken["seeds_ok"] == []
    assert broken["seeds_failed"]["0"]["stage"] == "train"
    assert "--model.temperature 5.0 must lie in" in broken["seeds_failed"]["0"]["error"]
    assert invalid["seeds_failed"]["0"] == {
        "stage": "config",
        "error": "model config: tower must be one of shared, separate; got 'sideways'",
    }
    assert not (out / "cells" / "invalid" / "seed0" / "run").exists()
    cell = json.loads((out / "cells" / "full" / "seed0" / "result.json").read_text())
    assert cell["steps"] == 2 and cell["budget"]["data.batch_size"] == 8
    # the key's fit config is the one the run saved, resolved before it ran
    saved = out / "cells" / "full" / "seed0" / "run" / "logs" / "version_0" / "config.yaml"
    assert cell["key"]["fit"] == flatten(yaml.safe_load(saved.read_text()))
    assert (out / "cells" / "broken" / "seed0" / "log.txt").is_file()

    text = (out / "ablation.md").read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | what | regime | seeds ok | R@1 | R@5 |")
    assert rows[1].startswith("| full | the tiny model | from scratch | 1/1 |")
    assert rows[2].startswith("| broken |") and "| 0/1 | failed |" in rows[2]
    assert "seed 0 failed (train):" in rows[2] and "temperature" in rows[2]

    # a rerun of the finished row trains nothing: the stored cell is reused, also by another
    # grid over the same out, which writes its own table beside the first
    shutil.rmtree(out / "cells" / "broken")
    other = {**config, "table": "other", "variants": config["variants"][:1]}
    other_path = write_yaml(tmp_path / "other.yaml", other)
    assert csmcir_cli.main(["ablate", "--config", str(other_path), "--out", str(out)]) == 0
    assert "full/seed0: done earlier, skipped" in capsys.readouterr().out
    assert (out / "ablation.md").read_text() == text
    assert json.loads((out / "other.json").read_text())["rows"][0]["seeds_ok"] == [0]
    assert json.loads((out / "cells" / "full" / "seed0" / "result.json").read_text()) == cell
    # its key, resolved in another process, is the same: a dry run says so too, and fails on
    # the invalid row
    assert csmcir_cli.main([*argv, "--dry-run"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "# full/seed0 (from scratch): reuses its finished run" in lines
    assert "# broken/seed0 (from scratch): runs: no earlier run" in lines
    assert "# invalid/seed0 (from scratch): runs: INVALID: model config: tower must be" in (
        "\n".join(lines)
    )
    assert lines[-1] == "invalid settings in 1 of 3 runs (the INVALID lines above)"
