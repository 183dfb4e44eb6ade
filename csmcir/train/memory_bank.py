"""Entropy-based, temporally dynamic memory bank of hard negatives (DESIGN.md section 3).

Query and target share one encoder, so target embeddings written at earlier steps are valid
negatives for today's queries, but only while the encoder has not drifted far from where they were
written, and only if they cannot take over the softmax: detached negatives receive no push back, so
a bank that holds most of the softmax mass drags the whole shared output cloud with it (the
measured collapse). The bank therefore (1) keeps a fixed-capacity ring buffer of detached,
L2-normalised target embeddings with their image id and write step, (2) uses only entries younger
than an age window (fixed, or set by an EMA of the in-batch prediction entropy), (3) picks per-query
negatives (all, random, hardest, or entropy-scaled hardest) after removing likely false negatives,
and (4) returns bank logits with a logit offset (and optionally a hard cap) that bounds the bank's
share of the softmax. Every operation is a tensor op over the whole buffer: no Python loop over
entries, and once the bank is open no value is read back to the host, so on a GPU a step queues
its kernels without waiting for them. The formulas are in docs/memory_bank.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from csmcir.errors import ConfigError

if TYPE_CHECKING:
    from csmcir.model import CSMCIR

Selection = Literal["all", "random", "hardest", "entropy"]
Window = Literal["fixed", "entropy"]
Staleness = Literal["none", "exp"]

EMPTY = -1  # write step of a slot that holds nothing (never written, or evicted)


@dataclass
class MemoryBankConfig:
    """Every knob of the bank; each part has an "off" setting so the ablation can switch it alone.

    A plain FIFO queue is ``selection="all", window="fixed", max_age=None, staleness="none",
    logit_offset=0.0``.
    """

    enabled: bool = False
    size: int = 4096
    """Capacity (entries). Ring-buffer writes overwrite the oldest slot."""
    selection: Selection = "hardest"
    """Per-query negatives: all live entries, ``top_k`` random, ``top_k`` hardest, or hardest with
    k scaled by the query's confidence (``entropy``)."""
    top_k: int = 64
    window: Window = "fixed"
    """``fixed``: entries up to ``max_age`` steps old are live. ``entropy`` (the method's
    definition): the window moves between ``min_age`` and ``max_age`` with the EMA of the
    normalised in-batch entropy. ``fixed`` is the default because behind the entropy gate the
    entropy window stayed at 38-49 steps against the fixed 50, and the two measured level
    (docs/memory_bank.md)."""
    min_age: int = 2
    """A_min (``entropy`` window): the window of a maximally uncertain model (H = 1); 0 switches
    the bank off then."""
    max_age: int | None = 50
    """A_max: the window of a fully confident model; None means no age limit (``fixed`` only)."""
    entropy_momentum: float = 0.9
    """EMA momentum m of the normalised in-batch entropy: H <- m H + (1 - m) mean_i h_i."""
    staleness: Staleness = "none"
    """``exp``: add -age / tau_age to each bank logit (weights exp(logit) by exp(-age/tau_age))."""
    tau_age: float = 20.0
    logit_offset: float | Literal["auto"] = "auto"
    """Added to every bank logit. ``auto`` = -log(live entries / in-batch candidates), at most 0;
    0.0 switches it off."""
    max_share: float | None = None
    """Hard cap on each query's bank share of the softmax, enforced by a further per-query
    (gradient-free) offset; None is off."""
    exclude_reference: bool = True
    """Also mask entries whose image id is the query's reference image."""
    fn_margin: float | None = None
    """Mask entries with cos(q, e) > cos(q, t+) + fn_margin (likely unlabelled positives);
    None is off."""
    start_step: int = 0
    """First global step at which the bank is read and written."""
    open_entropy: float | None = 0.2
    """The bank opens (and stays open) once the entropy EMA has fallen to this. Before the model
    has found the look-alike groups, the hardest entries pull queries the wrong way (open from step
    1 the bank slows training), so it waits until in-batch training has made the model confident
    (docs/memory_bank.md). None: open from ``start_step``."""
    probe_every: int = 20
    """Steps between probe-set drift measurements; 0 switches the probe off."""
    probe_size: int = 64

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"bank.{key}: {why}")

        if self.size < 1:
            raise bad("size", f"must be >= 1, got {self.size}")
        if self.selection not in ("all", "random", "hardest", "entropy"):
            raise bad("selection", f"must be all|random|hardest|entropy, got {self.selection!r}")
        if self.selection != "all" and self.top_k < 1:
            raise bad("top_k", f"must be >= 1 for selection {self.selection!r}, got {self.top_k}")
        if self.window not in ("fixed", "entropy"):
            raise bad("window", f"must be fixed|entropy, got {self.window!r}")
        if self.min_age < 0:
            raise bad("min_age", f"must be >= 0, got {self.min_age}")
        if self.max_age is None and self.window == "entropy":
            raise bad("max_age", "the entropy window needs a finite max_age (A_max)")
        if self.max_age is not None and self.max_age < self.min_age:
            raise bad("max_age", f"must be >= min_age ({self.min_age}), got {self.max_age}")
        if not 0.0 <= self.entropy_momentum < 1.0:
            raise bad("entropy_momentum", f"must be in [0, 1), got {self.entropy_momentum}")
        if self.staleness not in ("none", "exp"):
            raise bad("staleness", f"must be none|exp, got {self.staleness!r}")
        if self.staleness == "exp" and not self.tau_age > 0:
            raise bad("tau_age", f"must be > 0, got {self.tau_age}")
        if isinstance(self.logit_offset, str) and self.logit_offset != "auto":
            raise bad("logit_offset", f"must be a number or 'auto', got {self.logit_offset!r}")
        if self.max_share is not None and not 0.0 < self.max_share < 1.0:
            raise bad("max_share", f"must be in (0, 1) or null, got {self.max_share}")
        if self.open_entropy is not None and not 0.0 < self.open_entropy <= 1.0:
            raise bad("open_entropy", f"must be in (0, 1] or null, got {self.open_entropy}")
        if self.probe_every < 0 or self.probe_size < 1:
            raise bad("probe_every", "probe_every must be >= 0 and probe_size >= 1")


def normalized_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per row divided by log(number of finite logits): 0 = one-hot,
    1 = uniform. Masked (-inf) columns are not candidates and do not count."""
    logits = logits.detach().float()
    p = logits.softmax(dim=-1)
    n = torch.isfinite(logits).sum(dim=-1).clamp(min=2)
    return torch.special.entr(p).sum(dim=-1) / n.float().log()


def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine over distinct pairs of rows, in O(B D): near 1 means a collapsed batch."""
    x = F.normalize(x.detach().float(), dim=-1)
    b = x.shape[0]
    if b < 2:
        return x.new_zeros(())
    total = x.sum(dim=0).square().sum()
    return (total - b) / (b * (b - 1))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order (identity without a process group).

    Ranks may hold different batch sizes (a short last batch): rows are padded to the largest and
    trimmed after the gather.
    """
    if not _distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of a scalar over ranks, so the entropy EMA (and so the window) agrees everywhere."""
    if not _distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


@dataclass
class BankNegatives:
    """What the loss needs from the bank for one batch, in the form ``train.loss.info_nce`` takes.

    ``similarities`` [B, K] are cosines to the selected entries (gradient to the queries only),
    ``bias`` [B, K] the gradient-free additive logit terms (share offset, staleness, cap) applied
    after the temperature, ``mask`` [B, K] True where an entry is a usable negative.
    """

    similarities: Tensor
    bias: Tensor
    mask: Tensor
    stats: dict[str, Tensor]

    def logits(self, temperature: float | Tensor) -> Tensor:
        """similarity / temperature + bias, with -inf where masked: the extra softmax columns."""
        logits = self.similarities / temperature + self.bias
        return logits.masked_fill(~self.mask, -math.inf)


class MemoryBank(nn.Module):
    """Ring buffer of detached target embeddings; buffers, so a Lightning checkpoint carries it.

    Per training step (global step s), in this order:
    ``observe(in_batch_logits)`` -> ``negatives(q, t, in_batch_logits, ...)`` -> loss -> ``write(t,
    ids, s)``. Under DDP ``observe`` averages the entropy over ranks and ``write`` all-gathers the
    batch, so every rank holds the same bank.
    """

    def __init__(self, config: MemoryBankConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.register_buffer("embeddings", torch.zeros(config.size, dim))
        self.register_buffer("ids", torch.zeros(config.size, dtype=torch.long))
        self.register_buffer("written", torch.full((config.size,), EMPTY, dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))
        self.register_buffer("entropy_ema", torch.ones(()))
        self.register_buffer("opened_at", torch.full((), EMPTY, dtype=torch.long))
        self._probe: Tensor | None = None  # last probe snapshot; diagnostic only, not checkpointed
        # Host copy of "opened_at != EMPTY" (None: read the buffer), so an open bank's gate check
        # does not wait for the GPU every step; loading a checkpoint resets it.
        self._open: bool | None = None

    @classmethod
    def for_model(cls, config: MemoryBankConfig, model: CSMCIR) -> MemoryBank:
        """The bank of ``model``'s target embeddings; token-level targets are refused."""
        if model.config.target_text != "caption":
            raise ConfigError(
                f"bank.enabled needs one vector per target (model target_text='caption'), got "
                f"target_text={model.config.target_text!r}: token-level targets would multiply "
                "the bank's memory by the number of query tokens"
            )
        return cls(config, model.config.embed_dim)

    def active(self, step: int) -> bool:
        """Whether the bank is read and written at ``step``; the entropy gate latches open the
        first time it is checked with the EMA at or below ``open_entropy`` (call after
        ``observe``). Under DDP the EMA is the same on every rank, and so is the answer."""
        c = self.config
        if not c.enabled or step < c.start_step:
            return False
        if self._open is None:
            self._open = int(self.opened_at) != EMPTY
        if not self._open:
            if c.open_entropy is not None and float(self.entropy_ema) > c.open_entropy:
                return False
            self.opened_at.fill_(step)
            self._open = True
        return True

    # ---------------------------------------------------------------- temporal window
    @torch.no_grad()
    def observe(self, in_batch_logits: Tensor) -> Tensor:
        """Update the entropy EMA from this batch's in-batch logits (averaged over ranks);
        returns this step's mean normalised entropy."""
        batch_mean = all_reduce_mean(normalized_entropy(in_batch_logits).mean())
        m = self.config.entropy_momentum
        self.entropy_ema.mul_(m).add_((1.0 - m) * batch_mean.to(self.entropy_ema))
        return batch_mean

    def window(self) -> Tensor:
        """Usable age in steps (0-d, inf = no limit): A_max (fixed) or A_min + (A_max - A_min)
        (1 - H) (entropy); a tensor, so the entropy window is never read back to the host."""
        c = self.config
        if c.window == "fixed":
            return self.entropy_ema.new_full((), math.inf if c.max_age is None else c.max_age)
        h = self.entropy_ema.clamp(0.0, 1.0)
        return c.min_age + (c.max_age - c.min_age) * (1.0 - h)

    def ages(self, step: int) -> Tensor:
        return step - self.written

    def live_mask(self, step: int) -> Tensor:
        """Slots usable at ``step``: written before this step and no older than the window."""
        age = self.ages(step)
        return (self.written != EMPTY) & (age >= 1) & (age <= self.window())

    @torch.no_grad()
    def evict(self, step: int) -> Tensor:
        """Empty every slot older than the window; returns how many were evicted (0-d)."""
        stale = (self.written != EMPTY) & (self.ages(step) > self.window())
        self.written.masked_fill_(stale, EMPTY)
        return stale.sum()

    # ---------------------------------------------------------------- writes
    @torch.no_grad()
    def write(self, targets: Tensor, image_ids: Tensor, step: int, gather: bool = True) -> None:
        """Append L2-normalised, detached targets at the cursor, wrapping around; under DDP the
        all-gathered batch (rank order) is written, so every rank's bank is identical."""
        if gather:
            targets, image_ids = all_gather_cat(targets.detach()), all_gather_cat(image_ids)
        if targets.ndim != 2 or targets.shape[1] != self.dim:
            raise ConfigError(
                f"bank: target embeddings must be [B, {self.dim}], got {list(targets.shape)}; "
                "the bank needs 2-D targets (model.config.target_text='caption')"
            )
        size = self.config.size
        targets, image_ids = targets[-size:], image_ids[-size:]
        n = targets.shape[0]
        slots = (self.cursor + torch.arange(n, device=self.cursor.device)) % size
        self.embeddings[slots] = F.normalize(targets.detach().float(), dim=-1).to(self.embeddings)
        self.ids[slots] = image_ids.to(self.ids)
        self.written.index_fill_(0, slots, step)  # a scalar index_put would sync with the GPU
        self.cursor.copy_((self.cursor + n) % size)

    # ---------------------------------------------------------------- reads
    def negatives(
        self,
        q: Tensor,
        t: Tensor,
        in_batch_logits: Tensor,
        target_ids: Tensor,
        reference_ids: Tensor | None,
        step: int,
        temperature: float | Tensor,
    ) -> BankNegatives:
        """Bank negatives for each query: live entries, false negatives masked, selected, offset.

        ``q``, ``t`` are this rank's [B, D] queries and positives (L2-normalised),
        ``in_batch_logits`` the [B, N] in-batch logits (similarity / temperature) the loss uses:
        their per-query entropy h_i scales k for ``selection="entropy"``, their column count sets
        the ``auto`` offset and their mass the ``max_share`` cap.
        """
        c = self.config
        self.evict(step)
        live = self.live_mask(step)
        n_live = live.sum()  # 0-d: counts stay on the device
        b = q.shape[0]
        # ``all`` multiplies by the whole buffer; the copy keeps autograd's saved operand intact
        # when this step's write overwrites the ring buffer before the backward pass.
        full = q.float() @ self.embeddings.clone().T if c.selection == "all" else None
        with torch.no_grad():
            cos_all = full.detach() if full is not None else q.detach().float() @ self.embeddings.T
            false_neg = self.ids[None, :] == target_ids[:, None]
            if c.exclude_reference and reference_ids is not None:
                false_neg |= self.ids[None, :] == reference_ids[:, None]
            if c.fn_margin is not None:
                positive = (q.detach().float() * t.detach().float()).sum(dim=-1)
                false_neg |= cos_all > positive[:, None] + c.fn_margin
            blocked = false_neg.logical_or_(~live[None, :])  # [B, C]: dead or a false negative
            # blocked = fn | dead, so its count is B * dead + (false negatives among live entries);
            # count_nonzero, not sum: a bool sum first widens the [B, C] mask to int64, which
            # cost more than the bank's matrix product and top-k together (docs/memory_bank.md)
            n_false_neg = torch.count_nonzero(blocked) - b * (c.size - n_live)
            idx, keep = self._select(cos_all, blocked, in_batch_logits)

            age = self.ages(step).float()
            if idx is None:
                cos, age = full, age.expand(b, -1)
            else:
                age = age[idx]
            offset = self._offset(n_live, in_batch_logits.shape[-1])
            bias = offset.expand(age.shape).clone()
            if c.staleness == "exp":
                bias -= age / c.tau_age
            tau = temperature.detach() if isinstance(temperature, Tensor) else temperature
            in_lse = in_batch_logits.detach().float().logsumexp(dim=-1)
        if idx is not None:  # gradient to q only: the gathered entries are plain buffers
            picked = self.embeddings.index_select(0, idx.flatten()).view(*idx.shape, self.dim)
            cos = torch.einsum("bd,bkd->bk", q.float(), picked)  # index_select: 4x [idx]'s speed
        with torch.no_grad():
            logits = (cos.detach() / tau + bias).masked_fill(~keep, -math.inf)
            if c.max_share is not None:
                cap = math.log(c.max_share / (1.0 - c.max_share)) + in_lse - logits.logsumexp(-1)
                shift = cap.clamp(max=0.0)[:, None]
                bias += shift
                logits += shift
            share = torch.sigmoid(logits.logsumexp(dim=-1) - in_lse)
            window = self.window()
            stats = {
                "bank/live": n_live.float(),
                "bank/mean_age": (self.ages(step) * live).sum().float() / n_live.clamp(min=1),
                "bank/window": window.nan_to_num(posinf=-1.0),  # -1: no age limit
                "bank/entropy": self.entropy_ema.detach().clone(),
                "bank/open": 1.0,
                "bank/share": share.mean(),
                "bank/offset": offset,
                "bank/negatives": keep.sum(dim=-1).float().mean(),
                "bank/false_neg_share": n_false_neg.float() / (n_live * b).clamp(min=1),
                "bank/target_cos": mean_pairwise_cosine(t),
            }
        return BankNegatives(similarities=cos, bias=bias, mask=keep, stats=stats)

    def _select(
        self, cos: Tensor, blocked: Tensor, in_batch_logits: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """Column indices [B, k] (None for ``all``) and which of them are real negatives."""
        c = self.config
        if c.selection == "all":
            return None, ~blocked
        k = min(c.top_k, c.size)
        # ``cos`` is this step's scratch copy: masking it in place saves a [B, C] pass
        score = torch.rand_like(cos) if c.selection == "random" else cos
        values, idx = score.masked_fill_(blocked, -math.inf).topk(k, dim=-1)
        keep = torch.isfinite(values)
        if c.selection == "entropy":
            h = normalized_entropy(in_batch_logits).to(cos)
            k_i = torch.ceil(k * (1.0 - h.clamp(0.0, 1.0)))
            keep &= torch.arange(k, device=cos.device)[None, :] < k_i[:, None]
        return idx, keep

    def _offset(self, n_live: Tensor, n_in_batch: int) -> Tensor:
        """The bank logits' offset (0-d): the configured number, or for ``auto``
        -log(live / in-batch), 0 while the bank holds no more entries than the batch."""
        if self.config.logit_offset != "auto":
            return self.embeddings.new_full((), float(self.config.logit_offset))
        return -torch.log(n_live.float().clamp(min=n_in_batch) / n_in_batch)

    # ---------------------------------------------------------------- the training hook
    def extra_negatives(
        self,
        *,
        queries: Tensor,
        targets: Tensor,
        in_batch_logits: Tensor,
        target_keys: Tensor,
        reference_keys: Tensor,
        step: int,
        temperature: Tensor,
    ) -> dict[str, Any]:
        """One training step's use of the bank (``train.module.NegativeSource``): update the
        entropy clock, return this batch's negatives as ``info_nce`` keyword arguments plus
        ``stats``, then write the (all-gathered) targets. While the bank is shut (before
        ``start_step`` or the entropy gate): the entropy clock only."""
        self.observe(in_batch_logits)
        if not self.active(step):
            return {"stats": {"bank/entropy": self.entropy_ema.detach().clone(), "bank/open": 0.0}}
        neg = self.negatives(
            queries, targets, in_batch_logits, target_keys, reference_keys, step, temperature
        )
        self.write(targets, target_keys, step)
        return {
            "extra_logits": neg.similarities,
            "extra_bias": neg.bias,
            "extra_mask": neg.mask,
            "stats": neg.stats,
        }

    # ---------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def probe_drift(self, probe_embeddings: Tensor) -> Tensor | None:
        """Mean 1 - cos between the probe set's embeddings now and at the previous call (None on
        the first call). Call it every ``probe_every`` steps with the same fixed probe inputs."""
        now = F.normalize(probe_embeddings.detach().float(), dim=-1)
        before, self._probe = self._probe, now
        if before is None or before.shape != now.shape:
            return None
        return (1.0 - (now * before.to(now)).sum(dim=-1)).mean()

    def _load_from_state_dict(
        self, state_dict: dict[str, Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        saved = state_dict.get(prefix + "embeddings")
        if saved is not None and tuple(saved.shape) != (self.config.size, self.dim):
            raise ConfigError(
                f"bank: the checkpoint's bank is {list(saved.shape)} (entries x dim), but bank.size"
                f" is {self.config.size} and the embedding dim {self.dim}; set bank.size to "
                f"{saved.shape[0]} to resume"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._open = None
