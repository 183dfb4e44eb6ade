"""Tokenizers of the baseline's CLIP text tower, behind one small interface.

A random-initialised tiny CLIP uses the project's WordPiece vocabulary built from the training
texts (CLIP's 49k-token BPE table would dwarf a 64-d model); a pretrained OpenCLIP checkpoint
needs CLIP's own byte-level BPE, whose merges file ships inside the open_clip package, so
nothing is downloaded. Both pad to the text tower's fixed context length (CLIP adds a
positional table of exactly that length) and both save into the model folder, so the training
checkpoint and the exported folder carry the tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from transformers import PreTrainedTokenizerBase

from csmcir.errors import DataError
from csmcir.io import atomic_write_json, read_json
from csmcir.model.tokenizer import (
    TokenMemo,
    build_wordpiece_tokenizer,
    check_tokenizer,
    kept_texts,
    load_tokenizer,
    mostly_unknown,
)

OPEN_CLIP_FILE = "open_clip_tokenizer.json"


class TextTokenizer(Protocol):
    """What the baseline asks of a tokenizer."""

    kind: str
    eos_id: int
    pad_id: int

    def __len__(self) -> int: ...

    def encode(self, texts: Sequence[str], context_length: int) -> torch.Tensor: ...

    def kept_texts(self, texts: Sequence[str], context_length: int) -> list[str | None]: ...

    def mostly_unknown(self, texts: Sequence[str]) -> list[float | None]: ...

    def save_pretrained(self, folder: str | Path) -> None: ...

    def identity(self) -> Any: ...


class WordPieceTokenizer:
    """The project's WordPiece tokenizer: ``[CLS] text [SEP] [PAD]...``; CLIP pools at [SEP]."""

    kind = "wordpiece"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        check_tokenizer(tokenizer, "the baseline's WordPiece tokenizer")
        if tokenizer.sep_token_id is None:
            raise DataError("the baseline's WordPiece tokenizer lacks a [SEP] token")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.memo: TokenMemo | None = None  # made for the context length encode is given

    @classmethod
    def from_corpus(cls, texts: Sequence[str], vocab_size: int) -> WordPieceTokenizer:
        return cls(build_wordpiece_tokenizer(texts, vocab_size))

    @classmethod
    def load(cls, folder: str | Path) -> WordPieceTokenizer:
        return cls(load_tokenizer(folder))

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """``[B, context_length]`` ids; truncation keeps the final [SEP] the text tower pools."""
        if self.memo is None or self.memo.max_length != context_length:
            self.memo = TokenMemo(self.tokenizer, context_length)
        return self.memo(texts, pad_to=context_length)[0]

    def kept_texts(self, texts: Sequence[str], context_length: int) -> list[str | None]:
        """Per text: None when it fits, else the start that :meth:`encode` keeps."""
        return kept_texts(self.tokenizer, texts, context_length)

    def mostly_unknown(self, texts: Sequence[str]) -> list[float | None]:
        return mostly_unknown(self.tokenizer, texts)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def identity(self) -> Any:
        return self.tokenizer.get_vocab()


@cache
def _bpe_sha256() -> str:
    return hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest()


@cache
def _simple_tokenizer() -> SimpleTokenizer:
    """One shared instance: parsing the 49k merges takes a while, and encoding is stateless."""
    return SimpleTokenizer()


class OpenCLIPTokenizer:
    """CLIP's BPE tokenizer from the open_clip package: ``<sot> text <eot> 0...``.

    The saved file records the SHA-256 of the merges table instead of copying it, and loading
    refuses a folder written with a different table (another open_clip release), which would
    silently change every token id.
    """

    kind = "open_clip"

    def __init__(self) -> None:
        self.bpe = _simple_tokenizer()
        self.eos_id = self.bpe.eot_token_id
        self.pad_id = 0

    @classmethod
    def load(cls, folder: str | Path) -> OpenCLIPTokenizer:
        path = Path(folder) / OPEN_CLIP_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file missing in {folder}: {OPEN_CLIP_FILE}")
        saved = read_json(path, "open_clip tokenizer file")
        if not isinstance(saved, dict) or saved.get("bpe_sha256") != _bpe_sha256():
            raise DataError(
                f"{path}: the model was saved with another CLIP BPE table than the one of the "
                "installed open_clip package; install the open-clip-torch version it was "
                "trained with"
            )
        return cls()

    def __len__(self) -> int:
        return self.bpe.vocab_size

    def encode(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """``[B, context_length]`` ids; open_clip keeps <eot> (the argmax CLIP pools) last."""
        return self.bpe(list(texts), context_length=context_length)

    def kept_texts(self, texts: Sequence[str], context_length: int) -> list[str | None]:
        """Per text: None when it fits, else the start that :meth:`encode` keeps (between
        <sot> and <eot>, as CLIP's BPE normalises it: lower case, single spaces)."""
        room = context_length - 2
        tokens = [self.bpe.encode(text) for text in texts]
        return [None if len(t) <= room else self.bpe.decode(t[:room]).strip() for t in tokens]

    def mostly_unknown(self, texts: Sequence[str]) -> list[float | None]:
        """All None: CLIP's BPE works on bytes, so every character has tokens."""
        return [None] * len(texts)

    def save_pretrained(self, folder: str | Path) -> None:
        atomic_write_json(
            Path(folder) / OPEN_CLIP_FILE, {"tokenizer": self.kind, "bpe_sha256": _bpe_sha256()}
        )

    def identity(self) -> Any:
        return {"bpe_sha256": _bpe_sha256()}


def load_text_tokenizer(kind: str, folder: str | Path) -> TextTokenizer:
    """The tokenizer of ``kind`` saved in ``folder``."""
    return (
        OpenCLIPTokenizer.load(folder) if kind == "open_clip" else WordPieceTokenizer.load(folder)
    )
