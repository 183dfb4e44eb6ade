"""The `openai` backend against a real local HTTP server that injects faults, and kill-safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from captioning.backends.openai import OpenAIBackend, image_data_url
from captioning.fake_server import FakeChatServer, image_fingerprint
from captioning.prompts import PromptSpec
from captioning.runner import run_captioning
from captioning.store import CaptionStore
from csmcir.cli import main as csmcir_main
from csmcir.data.registry import load_split
from csmcir.data.synth import SynthConfig, generate
from csmcir.errors import ConfigError, CsmcirError

SPEC = PromptSpec("scene")

# Per-image plans: the behaviour of the server on the 1st, 2nd, ... request about the image.
PLANS = {
    "ok": ["ok"],
    "err500": ["500", "ok"],
    "err429": ["429", "429", "ok"],
    "slow": ["slow", "ok"],
    "badbody": ["bad_json", "ok"],
    "dropped": ["drop", "ok"],
    "garbage_once": ["garbage", "ok"],
    "mixed": ["500", "garbage", "429", "ok"],
    "always500": ["500"],
    "always_garbage": ["garbage"],
}


def make_images(folder: Path, n: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(path)
        paths[path.stem] = path
    return paths


def backend(server: FakeChatServer, **kw) -> OpenAIBackend:
    options = {"concurrency": 8, "timeout": 0.5, "http_retries": 3, "backoff": 0.01} | kw
    return OpenAIBackend(server.base_url, server.model, api_key_env=None, **options)


def test_every_image_ends_with_one_record_whatever_the_server_does(tmp_path):
    images = make_images(tmp_path / "img", 40)
    names = list(PLANS)
    plan_of = {
        image_fingerprint(image_data_url(p)): names[k % len(names)]
        for k, p in enumerate(images.values())
    }
    fingerprint = {i: image_fingerprint(image_data_url(p)) for i, p in images.items()}

    def script(fp: str, n: int) -> str:
        plan = PLANS[plan_of[fp]]
        return plan[min(n, len(plan) - 1)]

    with FakeChatServer(script=script, slow_seconds=1.5) as server:
        with CaptionStore(tmp_path / "out") as store:
            summary = run_captioning(backend(server), images, SPEC, store, 3, progress=False)
        requests = dict(server.requests)
    lines = [json.loads(x) for x in store.path.read_text().splitlines()]
    assert sorted(r["image_id"] for r in lines) == sorted(images)  # exactly one record each
    by_plan = {plan_of[fingerprint[r["image_id"]]]: r for r in lines}
    for r in lines:
        plan = plan_of[fingerprint[r["image_id"]]]
        if plan.startswith("always"):
            assert r["status"] == "failed", plan
        else:
            assert r["status"] == "ok", (plan, r)
            # the answer that was stored is the one about this very image
            assert (
                r["Final_Caption"] == f"a test image with fingerprint {fingerprint[r['image_id']]}"
            )
    assert summary.captioned == 32 and summary.failed == 8
    assert by_plan["always500"]["reason"] == "HTTP 500: internal error (injected) (after 4 tries)"
    assert by_plan["always_garbage"]["attempts"] == 3
    assert by_plan["always_garbage"]["reason"].startswith("no JSON object")
    assert by_plan["garbage_once"]["attempts"] == 2 and by_plan["mixed"]["attempts"] == 2
    assert by_plan["slow"]["attempts"] == 1  # a timeout is retried by the client, not re-asked
    expected_requests = {
        "ok": 1, "err500": 2, "err429": 3, "slow": 2, "badbody": 2, "dropped": 2,
        "garbage_once": 2, "mixed": 4, "always500": 4, "always_garbage": 3,
    }  # fmt: skip
    for fp, count in requests.items():
        assert count == expected_requests[plan_of[fp]], plan_of[fp]


def test_requests_carry_the_image_the_prompt_and_the_key(tmp_path, monkeypatch):
    images = make_images(tmp_path / "img", 2)
    monkeypatch.setenv("CAPTION_TEST_KEY", "s3cret")
    with FakeChatServer(api_key="s3cret") as server:
        client = OpenAIBackend(server.base_url, server.model, api_key_env="CAPTION_TEST_KEY")
        with CaptionStore(tmp_path / "out") as store:
            assert run_captioning(client, images, SPEC, store, progress=False).captioned == 2
        body = server.last_request
    assert body["model"] == "fake-mllm" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert system == {"role": "system", "content": SPEC.render().system}
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": SPEC.render().user}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert url in {image_data_url(p) for p in images.values()}


def test_wrong_key_model_or_url_stop_the_run_with_one_message(tmp_path):
    images = make_images(tmp_path / "img", 3)
    with (
        FakeChatServer(api_key="right") as server,
        CaptionStore(tmp_path / "a") as store,
        pytest.raises(ConfigError, match="401"),
    ):
        run_captioning(backend(server), images, SPEC, store, progress=False)
    with FakeChatServer() as server:
        wrong = OpenAIBackend(server.base_url, "other-model", api_key_env=None)
        with CaptionStore(tmp_path / "b") as store, pytest.raises(ConfigError, match="fake-mllm"):
            run_captioning(wrong, images, SPEC, store, progress=False)
        port = server.port
    gone = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "fake-mllm", api_key_env=None)
    with CaptionStore(tmp_path / "c") as store, pytest.raises(ConfigError, match="cannot reach"):
        run_captioning(gone, images, SPEC, store, progress=False)
    assert all(p.read_text() == "" for p in tmp_path.rglob("*.jsonl"))


def test_a_server_that_dies_mid_run_stops_the_run_resumably(tmp_path):
    images = make_images(tmp_path / "img", 40)
    errors: list[BaseException] = []

    def caption(client: OpenAIBackend, store: CaptionStore) -> None:
        try:
            run_captioning(client, images, SPEC, store, progress=False)
        except BaseException as e:
            errors.append(e)

    with CaptionStore(tmp_path / "out") as store:
        with FakeChatServer(latency=0.02) as server:
            client = backend(server, concurrency=2, http_retries=2)
            worker = threading.Thread(target=caption, args=(client, store))
            worker.start()
            while store.path.read_text().count("\n") < 3:
                time.sleep(0.005)
        worker.join(30)
    assert len(errors) == 1 and isinstance(errors[0], CsmcirError)
    assert "lost the server" in str(errors[0]) and "rerun" in str(errors[0])
    records = [json.loads(x) for x in store.path.read_text().splitlines()]
    assert 3 <= len(records) < len(images)  # stopped, not 37 failures written


def test_a_run_killed_mid_way_then_rerun_captions_every_image_once(tmp_path):
    root = tmp_path / "synthcir"
    generate(root, SynthConfig(train_refs=6, val_refs=3, test_refs=3, image_size=32))
    gallery = set()
    for split in ("train", "val", "test"):
        gallery |= set(load_split("synthcir", root, split).gallery)
    out = tmp_path / "caps"
    with FakeChatServer(latency=0.05) as server:
        args = [
            "caption", "run", "--benchmark", "synthcir", "--root", str(root), "--split", "all",
            "--backend", "openai", "--base-url", server.base_url, "--model", server.model,
            "--out", str(out), "--concurrency", "2", "--no-progress",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "csmcir", *args], env=env)
        shard = out / "shard-0000-of-0001.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if shard.exists() and shard.read_text().count("\n") >= 10:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = shard.read_text().count("\n")
        assert 10 <= done_before < len(gallery), "the kill came too late to test resumption"
        assert csmcir_main(args) == 0
    ids = [json.loads(line)["image_id"] for line in shard.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(gallery) and set(ids) == gallery
    merged = tmp_path / "captions.json"
    assert csmcir_main(["caption", "merge", str(out), "--out", str(merged)]) == 0
    assert len(json.loads(merged.read_text())) == len(gallery)
