"""Overhead of the memory bank: training-step time with a full bank against in-batch negatives only.

What is timed, per model: one optimiser step of the shared encoder (query and target forward
passes, InfoNCE, backward, AdamW), alternating steps without and with the bank so machine noise
hits both alike. The bank is full (``--entries`` live entries) and runs every part: entropy EMA,
age window and eviction, false-negative masks by id and margin, top-k hardest selection,
staleness, share offset, and the write of the batch. Models:

- ``tiny``: the tiny preset (64-d embeddings) from pixels, as it trains on the synthetic benchmark;
- ``quickstart``: the same step with the quickstart's own bank and batch (its config's size and
  top-k, batch 64; the bank open and every slot live), not the full bank of the other rows;
- ``qformer``: the real-size BLIP-2 Q-Former (768 hidden, 12 layers, 32 queries, 256-d embeddings)
  on cached ViT-g features ([B, 257, 1408], random), i.e. the frozen-ViT training step.

It also times the loss and bank alone on random embeddings of both sizes (no encoder), the
bank's absolute cost. Figures go to BENCHMARKS.md (section ``memory_bank``).

    python -m bench.bench_memory_bank --threads 1      # from the repository root

On a shared CPU use ``--threads 1``: with busy cores, OpenMP's thread synchronisation makes
every small tensor op milliseconds long and the timings meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.report import device_label, section_name, update_section
from csmcir.model import CSMCIR, build_wordpiece_tokenizer, load_preset
from csmcir.train.loss import info_nce
from csmcir.train.memory_bank import MemoryBank, MemoryBankConfig

WORDS = "red blue green small large circle square triangle left right top bottom move add remove"
TAU = 0.07


def corpus(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()
    return [
        " ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist())
        for _ in range(n)
    ]


QUICKSTART_BATCH = 64  # csmcir/configs/synthcir.yaml


def build_model(name: str) -> CSMCIR:
    texts = corpus(256, 0)
    if name in ("tiny", "quickstart"):
        return CSMCIR.from_preset("tiny", tokenizer_corpus=texts, seed=0)
    # Real-size Q-Former; the ViT reduced to one layer because its features come from the cache.
    tokenizer = build_wordpiece_tokenizer(texts)
    config = load_preset("blip2-vitg").config.replace(
        vision={"num_hidden_layers": 1}, qformer={"vocab_size": len(tokenizer)}
    )
    torch.manual_seed(0)
    return CSMCIR(config, tokenizer)


@dataclass
class Batch:
    query_texts: list[str]
    target_texts: list[str]
    query_vision: dict[str, torch.Tensor]
    target_vision: dict[str, torch.Tensor]
    ids: torch.Tensor


def make_batch(model: CSMCIR, size: int, seed: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(seed)
    if model.config.freeze_vision:  # cached ViT features
        patches = (model.config.image.size // model.config.vision["patch_size"]) ** 2 + 1
        shape = (size, patches, model.config.vision["hidden_size"])
        key = "vision_features"
    else:
        shape = (size, 3, model.config.image.size, model.config.image.size)
        key = "pixel_values"
    vision = [{key: torch.randn(shape, generator=g).to(device)} for _ in range(2)]
    texts = corpus(2 * size, seed + 1)
    ids = torch.arange(size, device=device) + seed * size
    return Batch(texts[:size], texts[size:], vision[0], vision[1], ids)


def full_bank(entries: int, dim: int, top_k: int, device: torch.device) -> MemoryBank:
    """A bank whose every slot is live at step 1, with every part of the formulation switched on."""
    config = MemoryBankConfig(
        enabled=True,
        size=entries,
        selection="hardest",
        top_k=top_k,
        window="entropy",
        min_age=entries,
        max_age=entries,
        staleness="exp",
        fn_margin=0.1,
        open_entropy=None,  # the gate open: the bank's full cost, from the first step
    )
    return filled(config, dim, device)


def quickstart_bank(dim: int, device: torch.device) -> MemoryBank:
    """The quickstart's bank (``MemoryBankConfig(enabled=True)``), open and full."""
    return filled(MemoryBankConfig(enabled=True, open_entropy=None), dim, device)


def filled(config: MemoryBankConfig, dim: int, device: torch.device) -> MemoryBank:
    """A bank of ``config`` with every slot written at step 0 (all live at step 1)."""
    bank = MemoryBank(config, dim).to(device)
    size = config.size
    bank.write(torch.randn(size, dim, device=device), torch.arange(size) - size, step=0)
    return bank


def bank_loss(
    bank: MemoryBank | None, q: torch.Tensor, t: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """InfoNCE over in-batch targets, plus the bank's negatives through the training hook the
    trainer calls (entropy clock, gate, read, write) when a bank is given."""
    sim = q @ t.T
    if bank is None:
        return info_nce(sim, TAU)
    extra = bank.extra_negatives(
        queries=q,
        targets=t,
        in_batch_logits=sim / TAU,
        target_keys=ids,
        reference_keys=ids,
        step=1,  # every slot was written at step 0, so all stay live; this batch's write is not
        temperature=torch.tensor(TAU),
    )
    extra.pop("stats")
    return info_nce(sim, TAU, **extra)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(
    label: str,
    step: Callable[[MemoryBank | None], None],
    bank: MemoryBank,
    repeats: int,
    device: torch.device,
) -> tuple[float, float]:
    """Median seconds of a step without and with the bank, alternating, after one warm-up each."""
    without, with_bank = [], []
    step(None)
    step(bank)
    for _ in tqdm(range(repeats), desc=label, unit="pair"):
        without.append(timed(lambda: step(None), device))
        with_bank.append(timed(lambda: step(bank), device))
    return statistics.median(without), statistics.median(with_bank)


def model_row(name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    model = build_model(name).to(device).train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dim = model.config.embed_dim
    if name == "quickstart":
        batch = make_batch(model, QUICKSTART_BATCH, seed=1, device=device)
        bank = quickstart_bank(dim, device)
    else:
        batch = make_batch(model, args.batch, seed=1, device=device)
        bank = full_bank(args.entries, dim, args.k, device)

    def step(bank: MemoryBank | None) -> None:
        q = model.encode_query(batch.query_texts, **batch.query_vision)
        t = model.encode_target(batch.target_texts, **batch.target_vision)
        loss = bank_loss(bank, q, t, batch.ids)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    base, banked = compare(f"{name} step", step, bank, args.repeats, device)
    params = model.num_parameters(trainable_only=True) / 1e6
    what = "cached ViT-g features" if name == "qformer" else "pixels"
    label = f"{name} ({params:.1f}M trainable, {what})"
    if name == "quickstart":
        size = bank.config.size
        label = f"tiny, the quickstart's bank ({size:,} entries, top-{bank.config.top_k}, batch 64)"
    return [
        label,
        str(model.config.embed_dim),
        f"{base * 1e3:.1f}",
        f"{banked * 1e3:.1f}",
        f"{(banked / base - 1) * 100:+.1f}%",
    ]


def loss_only_row(dim: int, args: argparse.Namespace, device: torch.device) -> list[str]:
    g = torch.Generator().manual_seed(dim)
    q0 = F.normalize(torch.randn(args.batch, dim, generator=g), dim=-1).to(device)
    t0 = F.normalize(torch.randn(args.batch, dim, generator=g), dim=-1).to(device)
    ids = torch.arange(args.batch, device=device)
    bank = full_bank(args.entries, dim, args.k, device)

    def step(bank: MemoryBank | None) -> None:
        q, t = q0.clone().requires_grad_(), t0.clone().requires_grad_()
        bank_loss(bank, q, t, ids).backward()

    repeats = args.repeats * 10
    base, banked = compare(f"loss only, {dim}-d", step, bank, repeats, device)
    return [
        f"loss + bank alone, random {dim}-d embeddings",
        str(dim),
        f"{base * 1e3:.2f}",
        f"{banked * 1e3:.2f}",
        f"+{(banked - base) * 1e3:.2f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=65536)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed step pairs per model")
    parser.add_argument("--models", nargs="+", default=["tiny", "quickstart", "qformer"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = [model_row(name, args, device) for name in args.models]
    rows += [loss_only_row(dim, args, device) for dim in (64, 256)]
    header = ["step", "embed dim", "in-batch only (ms)", "with bank (ms)", "overhead"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    device_name = device_label(device, args.threads)
    body = (
        "## Memory bank overhead\n\n"
        f"Median training-step time over {args.repeats} alternating step pairs (loss-only rows: "
        f"{args.repeats * 10}), batch {args.batch} (the quickstart's row: 64), on {device_name}. "
        "The bank is full: "
        f"{args.entries:,} live entries, top-{args.k} hardest per query, entropy window, "
        "false-negative masks by id and margin, staleness, share offset, and the write of the "
        "batch. A step is the query and target forward passes of the shared encoder, InfoNCE, "
        "backward and AdamW. `qformer` is the real-size BLIP-2 Q-Former on cached ViT-g "
        "features (the frozen-ViT training step; the ViT itself is not run).\n\n" + "\n".join(lines)
    )
    print(body)
    if not args.no_write:
        update_section(section_name("memory_bank", device), body)


if __name__ == "__main__":
    main()
