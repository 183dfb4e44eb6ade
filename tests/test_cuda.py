"""The GPU paths: autocast precisions, the memory bank, Lightning training, evaluation and the hf
captioning backend on CUDA agree with the CPU. Skipped where no CUDA device is present (CI); run
them on a GPU machine with ``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_captioning_hf import build_tiny_qwen2_vl
from test_model import TEXTS, images, tiny

from captioning.backends.base import Request
from captioning.backends.hf import HFBackend
from captioning.prompts import PromptSpec
from csmcir import cli as csmcir_cli
from csmcir.data.prefetch import Ahead, PrefetchLoader, loader_options
from csmcir.model.features import extract_features
from csmcir.train.datamodule import CIRDataModule
from csmcir.train.export import model_from_checkpoint
from csmcir.train.loss import info_nce
from csmcir.train.memory_bank import MemoryBank, MemoryBankConfig
from csmcir.train.module import CSMCIRModule, adamw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def encode_both(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_query(TEXTS, pixels), model.encode_target(TEXTS[::-1], pixels.flip(0))


def test_fp32_on_cuda_matches_the_cpu() -> None:
    cpu = tiny()
    pixels = cpu.preprocess(images())
    with torch.no_grad():
        expected = encode_both(cpu, pixels)
        got = encode_both(cpu.to(CUDA), pixels.to(CUDA))
    for e, g in zip(expected, got, strict=True):
        assert g.device.type == "cuda" and g.dtype == torch.float32
        torch.testing.assert_close(g.cpu(), e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_in_float32_weights(precision: str) -> None:
    """Autocast changes the arithmetic, not the result's meaning: embeddings stay unit float32
    vectors close to fp32's, and every trainable weight gets a finite float32 gradient."""
    reference = tiny().to(CUDA)
    model = tiny(precision=precision).to(CUDA).train()
    pixels = reference.preprocess(images()).to(CUDA)
    with torch.no_grad():
        expected = encode_both(reference.train(), pixels)
    q, t = encode_both(model, pixels)
    for e, g in zip(expected, (q, t), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(3, device=CUDA))
        assert F.cosine_similarity(g.detach(), e).min() > 0.98
    info_nce(model.similarity(q, t), 0.07).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)


def test_memory_bank_hook_on_cuda_matches_the_cpu() -> None:
    config = MemoryBankConfig(
        enabled=True, size=64, selection="hardest", top_k=8, window="entropy", min_age=10,
        max_age=40, staleness="exp", fn_margin=0.1, open_entropy=None,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    entries = F.normalize(torch.randn(48, 16, generator=g), dim=-1)
    q = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    t = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    keys = torch.arange(6)
    outputs = []
    for device in ("cpu", CUDA):
        bank = MemoryBank(config, dim=16).to(device)
        bank.write(entries.to(device), torch.arange(48, device=device) % 10, step=0)
        qd, td = q.detach().to(device).requires_grad_(), t.to(device)
        extra = bank.extra_negatives(
            queries=qd, targets=td, in_batch_logits=qd.detach() @ td.T / 0.07,
            target_keys=keys.to(device), reference_keys=keys.to(device) + 100, step=5,
            temperature=torch.tensor(0.07, device=device),
        )  # fmt: skip
        stats = {k: float(v) for k, v in extra.pop("stats").items()}
        loss = info_nce(qd @ td.T, 0.07, **extra)
        loss.backward()
        outputs.append((loss.detach().cpu(), qd.grad.cpu(), stats, bank.ids.cpu()))
    (cpu_loss, cpu_grad, cpu_stats, cpu_keys), (gpu_loss, gpu_grad, gpu_stats, gpu_keys) = outputs
    torch.testing.assert_close(gpu_loss, cpu_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu_grad, cpu_grad, atol=1e-5, rtol=1e-4)
    assert gpu_stats == pytest.approx(cpu_stats, abs=1e-5)
    assert torch.equal(gpu_keys, cpu_keys)


@pytest.mark.parametrize("selection", ["all", "random", "hardest", "entropy"])
@pytest.mark.parametrize("window", ["fixed", "entropy"])
def test_an_open_bank_never_waits_for_the_gpu(selection: str, window: str) -> None:
    """Once open, the hook (read, masks, selection, stats, write) and the loss only queue
    kernels: a read-back to the host would stall every training step (torch raises on one)."""
    config = MemoryBankConfig(
        enabled=True, size=256, selection=selection, top_k=8, window=window, max_age=50,
        staleness="exp", fn_margin=0.1, open_entropy=0.99,
    )  # fmt: skip
    bank = MemoryBank(config, dim=16).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)

    def step(s: int) -> torch.Tensor:
        q = F.normalize(torch.randn(8, 16, device=CUDA, generator=g), dim=-1).requires_grad_()
        t = F.normalize(torch.randn(8, 16, device=CUDA, generator=g), dim=-1)
        keys = torch.arange(8, device=CUDA) + 8 * s
        extra = bank.extra_negatives(
            queries=q, targets=t, in_batch_logits=q.detach() @ t.T / 0.05, target_keys=keys,
            reference_keys=keys + 1000, step=s, temperature=torch.full((), 0.05, device=CUDA),
        )  # fmt: skip
        extra.pop("stats")
        loss = info_nce(q @ t.T, 0.05, **extra)
        loss.backward()
        return loss.detach()

    for s in range(3):  # the gate's check may read the EMA until the bank opens
        step(s)
    assert bank.active(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(s) for s in range(3, 6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(loss.isfinite()) for loss in losses)


def test_a_cached_training_step_never_waits_for_the_gpu() -> None:
    """The step from cached features (float16 batches pinned by the loader, copied without
    blocking and widened on the device; tokenisation; both passes under bf16 autocast; InfoNCE;
    backward; the fused AdamW step) only queues kernels: torch raises on a read-back."""
    model = tiny(precision="bf16", freeze_vision=True).to(CUDA).train()
    optimizer = adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-4)
    assert optimizer.defaults["fused"]
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(3, 65, 64, generator=g).half().pin_memory() for _ in range(2)]

    def step() -> torch.Tensor:
        reference, target = (f.to(CUDA, non_blocking=True) for f in features)
        q = model.encode_query(TEXTS, vision_features=reference)
        t = model.encode_target(TEXTS[::-1], vision_features=target)
        loss = info_nce(model.similarity(q, t), 0.07)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # optimiser state and library handles are made on the first step
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(loss.isfinite()) for loss in losses)


def test_the_datamodule_pins_batches_for_the_gpu(synthcir, captions) -> None:
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=8, cache_images=True)
    data.trainer = trainer
    data.setup("fit")
    data.attach(tiny())
    batch = next(iter(data.train_dataloader()))
    assert batch["reference_image"].is_pinned() and batch["target_image"].is_pinned()


def test_training_on_the_gpu_with_bank_and_bf16_resumes_on_the_cpu(
    synthcir, captions, tmp_path
) -> None:
    L.seed_everything(0)
    module = CSMCIRModule(
        model_options={"precision": "bf16"},
        warmup_steps=1,
        bank=MemoryBankConfig(enabled=True, size=64, top_k=8, open_entropy=None),
    )
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=6, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    data = CIRDataModule("synthcir", synthcir, captions, batch_size=8, cache_images=True)
    trainer.fit(module, data)
    assert trainer.global_step == 6 and trainer.strategy.root_device.type == "cuda"
    assert int(module.memory_bank.cursor) == 6 * 8  # a write a step
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint)
    assert model.device.type == "cpu" and model.config.precision == "bf16"
    trained = module.model.float().cpu().eval()
    for (name, p), (_, saved) in zip(
        trained.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, saved), name


def test_eval_on_cuda_scores_like_the_cpu(synthcir, captions, tmp_path) -> None:
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        argv = [
            "eval", "--model", "tiny", "--benchmark", "synthcir", "--root", str(synthcir),
            "--captions", str(captions), "--split", "val", "--device", device, "--no-cache",
            "--out", str(out),
        ]  # fmt: skip
        assert csmcir_cli.main(argv) == 0
        results[device] = json.loads(out.read_text())["metrics"]["synthcir"]
    queries = 16
    for key, value in results["cpu"].items():  # at most one query's rank may flip on a near-tie
        assert abs(results["cuda"][key] - value) <= 100 / queries + 1e-6, key


def test_the_prefetch_thread_hands_over_pinned_batches() -> None:
    """What fit reads a feature cache with on a GPU: batches made a thread ahead, pinned there,
    so the step's copy to the device does not block."""
    features = torch.randn(12, 65, 64).half()
    loader = PrefetchLoader(
        features, batch_size=4, **loader_options(features=True, num_workers=4, on_cuda=True)
    )
    batches = iter(loader)
    assert isinstance(batches, Ahead) and loader.num_workers == 0
    got = list(batches)
    assert all(b.is_pinned() for b in got)
    assert torch.equal(torch.cat(got), features)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_extraction_on_the_gpu_matches_the_cpu(synthcir, tmp_path, precision: str) -> None:
    """The pipelined extraction on CUDA (decoding workers, pinned non-blocking copies, the
    shard-writer thread waiting on CUDA events) stores the CPU's rows: equal within TF32 and float16
    rounding in fp32, close in bf16."""
    from csmcir.data.registry import load_split

    split = load_split("synthcir", synthcir, "val")
    paths = {i: split.image_path(i) for i in split.referenced_images()}
    caches = {}
    for device, workers in (("cpu", 0), ("cuda", 2)):
        model = tiny(freeze_vision=True, precision="fp32" if device == "cpu" else precision)
        caches[device] = extract_features(
            model.to(device), paths, tmp_path / device, batch_size=5, shard_size=7,
            workers=workers, progress=False,
        )  # fmt: skip
    ids = list(paths)
    assert caches["cuda"].ids() == ids
    cpu, gpu = (caches[d].get(ids).float() for d in ("cpu", "cuda"))
    if precision == "fp32":
        torch.testing.assert_close(gpu, cpu, atol=1e-2, rtol=1e-2)  # TF32 convolution, fp16 rows
    else:
        assert F.cosine_similarity(gpu.flatten(1), cpu.flatten(1)).min() > 0.99


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


def test_hf_backend_generates_on_cuda(tiny_mllm, tmp_path) -> None:
    spec = PromptSpec("scene")
    requests = []
    for i, size in enumerate([(40, 40), (90, 50)]):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", size, (60 * i, 120, 200 - 50 * i)).save(path)
        requests.append(Request(f"im{i}", path, spec))
    answers = {}
    for dtype, device in (("float32", "cpu"), ("float32", "cuda"), ("bfloat16", "cuda")):
        backend = HFBackend(tiny_mllm, dtype=dtype, device=device, batch_size=2, max_new_tokens=8)
        backend.load()
        answers[dtype, device] = [a.text for a in backend.generate_batch(requests)]
    assert answers["float32", "cuda"] == answers["float32", "cpu"]
    assert all(len(text.split()) == 8 for text in answers["bfloat16", "cuda"])


def test_quickstart_runs_on_the_gpu(tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO)
    root, run_dir = tmp_path / "data", tmp_path / "run"
    argv = ["quickstart", "--root", str(root), "--run-dir", str(run_dir), "--size", "small"]
    assert csmcir_cli.main([*argv, "--steps", "12", "--device", "cuda"]) == 0
    assert "[7/7]" in capsys.readouterr().out
    assert "GPU available: True (cuda), used: True" in caplog.text
    assert (run_dir / "quickstart" / "retrieval_grid.png").is_file()
