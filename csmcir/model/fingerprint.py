"""Content hashes of a model, the key of feature caches and gallery indexes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch


def tensor_fingerprint(kind: str, meta: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A 32-hex-digit SHA-256 prefix of ``meta`` (as canonical JSON) and every named tensor's bytes.

    Always recomputed from the bytes: a cached digest could miss an in-place edit made through
    ``.data``, and a stale fingerprint would let a stale feature cache pass as valid.
    """
    h = hashlib.sha256()
    h.update(f"{kind}\0{json.dumps(meta, sort_keys=True, default=str)}\0".encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{data.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]
