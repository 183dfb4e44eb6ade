"""Hub names wherever a model is named, against a fake hub endpoint on 127.0.0.1.

The repos are built at test time in the layouts the hub has (a tiny BLIP-2 retrieval folder, a
``google-bert/bert-base-uncased`` tokenizer written file by file, a tiny Qwen2-VL), each with
weight files in formats the use must not fetch: the server fails the test if one is requested.
The user's paths run from hub names (``fit``, ``convert lavis``, ``caption run --backend hf``),
then again with the server stopped and ``HF_HUB_OFFLINE=1``, from the cache in ``HF_HOME``.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from blip2_folder import make_blip2_folder, random_blip2
from fake_hub import FakeHub, Repo
from hub_layouts import bert_base_uncased_files, bert_vocab
from safetensors.torch import load
from safetensors.torch import save as safetensors_bytes
from test_baseline_clip4cir import TINY_CLIP
from test_captioning_hf import build_tiny_qwen2_vl
from test_lavis_convert import to_lavis

from csmcir import hub
from csmcir.cli import main as csmcir_main
from csmcir.data.synth import SynthConfig, generate
from csmcir.evaluation.encode import load_model
from csmcir.model import CSMCIR
from csmcir.model.features_cli import load_model as features_model

BLIP2, BERT, MLLM, CLIP = (
    "Salesforce/blip2-itm-vit-g",
    "google-bert/bert-base-uncased",
    "Qwen/Qwen2-VL-tiny",
    "laion/CLIP-tiny",
)
# Weights in formats a use must not fetch when the repo has a better one (never valid files).
DECOYS = {
    "pytorch_model.bin": b"not to be fetched",
    "tf_model.h5": b"not to be fetched",
    "flax_model.msgpack": b"not to be fetched",
    "README.md": b"# a model card",
}
BERT_DECOYS = DECOYS | {
    "model.safetensors": b"not to be fetched",
    "coreml/fill-mask/float32_model.mlpackage/Manifest.json": b"{}",
}
TOKENIZER_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Repo]:
    root = tmp_path_factory.mktemp("hub-src")
    blip2, _ = make_blip2_folder(root / "blip2")
    bert = {k: v.encode() for k, v in bert_base_uncased_files().items()}
    mllm = build_tiny_qwen2_vl(root / "qwen")
    torch.manual_seed(1)
    clip = {  # a real tiny OpenCLIP, and the formats open_clip prefers less
        "open_clip_config.json": json.dumps({"model_cfg": TINY_CLIP}).encode(),
        "open_clip_model.safetensors": safetensors_bytes(open_clip.CLIP(**TINY_CLIP).state_dict()),
        "open_clip_pytorch_model.bin": b"not to be fetched",
        "model.safetensors": b"not to be fetched",
    }
    return {
        BLIP2: Repo.from_folder(blip2, extra=DECOYS),
        BERT: Repo(bert | BERT_DECOYS),
        MLLM: Repo.from_folder(mllm, extra=DECOYS),
        CLIP: Repo(clip),
        "org/gated": Repo(bert, gated=True),
        "org/tokenizer-only": Repo(bert),
    }


@pytest.fixture
def fake_hub(repos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # no stored login of this machine
    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def fetched(server: FakeHub, repo: str) -> set[str]:
    """The files of ``repo`` the server was asked about at all (HEAD or GET)."""
    prefix = f"/{repo}/resolve/"
    return {p[len(prefix) :].split("/", 1)[1] for _, p in server.requests if p.startswith(prefix)}


def test_each_use_fetches_only_its_files(fake_hub, repos, tmp_path) -> None:
    folder = hub.resolve(BERT, hub.TOKENIZER, "--tokenizer")
    assert fetched(fake_hub, BERT) == TOKENIZER_FILES  # no weights, no coreml
    assert folder.is_relative_to(tmp_path / "hf-home" / "hub")
    assert {p.name for p in folder.iterdir()} == TOKENIZER_FILES
    model = hub.resolve(f"hf-hub:{BLIP2}", hub.MODEL, "--model")  # open_clip's spelling too
    wanted = set(repos[BLIP2].files) - set(DECOYS)
    assert fetched(fake_hub, BLIP2) == wanted and "model.safetensors" in wanted
    assert CSMCIR.from_pretrained(model).config.preset == "blip2-vitg"
    baseline = CSMCIR.from_preset("clip4cir-openclip", weights=f"hf-hub:{CLIP}")
    assert fetched(fake_hub, CLIP) == {"open_clip_config.json", "open_clip_model.safetensors"}
    served = load(repos[CLIP].files["open_clip_model.safetensors"])
    assert all(torch.equal(baseline.clip.state_dict()[k], v) for k, v in served.items())
    commit = repos[BERT].commit
    assert hub.resolve(f"{BERT}@{commit}", hub.TOKENIZER, "--tokenizer").name == commit


def test_model_arguments_take_hub_names(fake_hub) -> None:
    """--model of eval / index build / plots, of features, and a preset's weights."""
    assert load_model(BLIP2, corpus=list).config.preset == "blip2-vitg"
    assert features_model(BLIP2, None).config.preset == "blip2-vitg"
    assert CSMCIR.from_preset("blip2-vitg", weights=f"hf-hub:{BLIP2}").config.itm_head
    assert not fetched(fake_hub, BLIP2) & set(DECOYS)
    with pytest.raises(hub.HubError, match="--model org/none: no such local path"):
        load_model("org/none", corpus=list)


def test_an_index_of_a_hub_model_records_its_cached_folder(fake_hub, tmp_path) -> None:
    """Not a copy of the model in INDEX/model, as for an untrained preset."""
    small = tmp_path / "small"
    generate(small, SynthConfig(train_refs=2, val_refs=1, test_refs=1, image_size=40))
    argv = ["index", "build", "--model", BLIP2, "--benchmark", "synthcir", "--root", str(small)]
    argv += ["--empty-captions", "--no-cache", "--device", "cpu", "--out", str(tmp_path / "idx")]
    assert csmcir_main(argv) == 0
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert hub.Path(meta["model_dir"]).is_relative_to(tmp_path / "hf-home" / "hub")
    assert not (tmp_path / "idx" / "model").exists()


def test_a_local_path_wins_and_non_names_stay_paths(fake_hub, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "google-bert" / "bert-base-uncased").mkdir(parents=True)
    assert hub.resolve(BERT, hub.TOKENIZER, "--tokenizer") == hub.Path(BERT)
    assert hub.resolve("no/such/path", hub.MODEL, "--model") == hub.Path("no/such/path")
    assert hub.resolve("tiny", hub.MODEL, "--model") == hub.Path("tiny")
    assert fake_hub.requests == []


def test_what_cannot_be_had_is_one_message(fake_hub, monkeypatch) -> None:
    cases = {
        "org/missing": "has no such repo, or it is private",
        "org/gated": "the repo is gated",
        f"{BERT}@v9": "the repo has no such revision",
    }
    for name, reason in cases.items():
        with pytest.raises(hub.HubError) as err:
            hub.resolve(name, hub.TOKENIZER, "--tokenizer")
        message = str(err.value)
        assert message.startswith(f"--tokenizer {name}: no such local path") and reason in message
        assert '--include "tokenizer_config.json"' in message and "hf download" in message
    with pytest.raises(hub.HubError, match="the repo has no weights"):
        hub.resolve("org/tokenizer-only", hub.VISION, "--vision")
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a gated repo with a token
    assert (hub.resolve("org/gated", hub.TOKENIZER, "--tokenizer") / "vocab.txt").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=r"HF_HUB_OFFLINE is set and the hub cache .* holds no"):
        hub.resolve(MLLM, hub.MLLM, "--model-dir")


def test_an_unreachable_hub_falls_back_to_the_cache(fake_hub, repos, monkeypatch) -> None:
    first = hub.resolve(BERT, hub.TOKENIZER, "--tokenizer")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert hub.resolve(BERT, hub.TOKENIZER, "--tokenizer") == first
    with pytest.raises(hub.HubError, match=r"cannot be reached .* holds no snapshot"):
        hub.resolve(MLLM, hub.MLLM, "--model-dir")


@pytest.mark.slow
def test_the_users_paths_from_hub_names_then_offline(
    repos, synthcir, captions, tmp_path, monkeypatch, capsys, one_thread
) -> None:
    """fit, convert lavis and caption run from hub names; then the same from the cache alone."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    blip = random_blip2(len(bert_vocab()) + 1, seed=5)  # + LAVIS's [DEC]
    torch.save({"model": to_lavis(blip)}, tmp_path / "stage1.pth")
    small = tmp_path / "small"
    generate(small, SynthConfig(train_refs=2, val_refs=1, test_refs=1, image_size=40))

    def users_paths(tag: str) -> None:
        fit = ["fit", "--config", "synthcir", "--model.preset", "blip2-vitg"]
        fit += ["--model.weights", BLIP2, "--data.root", str(synthcir)]
        fit += ["--data.captions", str(captions), "--data.batch_size", "8"]
        fit += ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
        fit += ["--trainer.default_root_dir", str(tmp_path / f"run-{tag}")]
        fit += ["--trainer.enable_progress_bar", "false", "--model.warmup_steps", "1"]
        assert csmcir_main(fit) == 0, capsys.readouterr().err
        trained = CSMCIR.from_pretrained(tmp_path / f"run-{tag}" / "model")
        assert trained.config.preset == "blip2-vitg"
        convert = ["convert", "lavis", str(tmp_path / "stage1.pth"), "--tokenizer", BERT]
        convert += ["--out", str(tmp_path / f"lavis-{tag}"), "--vision-heads", "4"]
        assert csmcir_main([*convert, "--qformer-heads", "4"]) == 0, capsys.readouterr().err
        caption = ["caption", "run", "--benchmark", "synthcir", "--root", str(small)]
        caption += ["--split", "val", "--backend", "hf", "--model-dir", MLLM]
        caption += ["--dtype", "float32", "--device", "cpu", "--max-new-tokens", "4"]
        caption += ["--max-attempts", "1", "--out", str(tmp_path / f"caps-{tag}")]
        assert csmcir_main(caption) == 0, capsys.readouterr().err
        shard = tmp_path / f"caps-{tag}" / "shard-0000-of-0001.jsonl"
        first = json.loads(shard.read_text().splitlines()[0])
        assert first["model"] == f"hf:{MLLM}"

    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        users_paths("online")
    for repo, wanted in {
        BLIP2: set(repos[BLIP2].files) - set(DECOYS),
        BERT: TOKENIZER_FILES,
        MLLM: set(repos[MLLM].files) - set(DECOYS),
    }.items():
        assert fetched(server, repo) == wanted, repo
        assert server.downloads(repo) == wanted, repo  # each downloaded once, decoys never
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone: the cache alone
    users_paths("offline")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.resolve("Qwen/Qwen2-VL-2B-Instruct", hub.MLLM, "--model-dir")
