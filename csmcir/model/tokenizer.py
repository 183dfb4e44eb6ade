"""Tokenizers: a WordPiece vocabulary built from a corpus (tiny preset), or the one of the weights.

A random-initialised model has no pretrained vocabulary, and the 30k-token BERT vocabulary would
dwarf a 64-d model, so the tiny preset builds a small WordPiece vocabulary from its training texts
(modification texts + target captions) and saves it beside the weights.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    BertTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    TokenizersBackend,
)
from transformers.models.auto.tokenization_auto import (
    TOKENIZER_MAPPING_NAMES,
    tokenizer_class_from_name,
)

from csmcir.errors import ConfigError, DataError
from csmcir.io import read_json

# [PAD] must be id 0: the Q-Former's word embeddings use padding_idx = pad_token_id = 0.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILES = ("tokenizer_config.json",)
VOCAB_FILES = ("tokenizer.json", "vocab.txt")
# Always in the vocabulary, so test-time words unseen in the corpus still spell out.
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def build_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Build a lower-cased BERT-style WordPiece tokenizer from ``texts``, deterministically.

    The vocabulary is the special tokens, every character seen plus ASCII letters, digits and
    punctuation (alone and as ``##`` continuations, so unseen words spell out instead of
    becoming [UNK]), then the corpus' words, most frequent first, up to ``vocab_size``. The
    ``tokenizers`` WordPiece trainer breaks ties in hash order, so the same corpus gave
    different vocabularies from run to run; a seeded untrained model must not.
    Encodings look like BERT's (``[CLS] tokens [SEP]``): the fused pass reads the [CLS] output.
    """
    corpus = list(texts)
    bad = [i for i, t in enumerate(corpus) if not isinstance(t, str)]
    if bad:
        kind = type(corpus[bad[0]]).__name__
        raise ConfigError(f"tokenizer corpus: item {bad[0]} is a {kind}, not a str")
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word
        for text in corpus
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    if not counts:
        raise ConfigError("tokenizer corpus is empty: pass the modification texts and captions")
    chars = sorted({c for word in counts for c in word} | set(BASE_ALPHABET))
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    if vocab_size < len(vocab):
        raise ConfigError(
            f"tokenizer vocab_size {vocab_size} is below the {len(vocab)} special and "
            "character tokens this corpus needs"
        )
    frequent = sorted(
        (w for w, n in counts.items() if n >= min_frequency and len(w) > 1),
        key=lambda w: (-counts[w], w),
    )
    vocab += frequent[: vocab_size - len(vocab)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, SPECIAL_TOKENS.index(t)) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def kept_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[str | None]:
    """Per text: None when it fits in ``max_length`` tokens (special tokens included), else the
    start of it that truncation keeps, i.e. what the model reads of it."""
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    return [
        None if n <= max_length else _kept(tokenizer, text, max_length)
        for text, n in zip(texts, lengths, strict=True)
    ]


def _kept(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> str:
    enc = tokenizer(
        text,
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=tokenizer.is_fast,
    )
    if not tokenizer.is_fast:
        return tokenizer.decode(enc["input_ids"], skip_special_tokens=True)
    ends = [
        end
        for (_, end), special in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
        if not special
    ]
    return text[: ends[-1]] if ends else ""


MOSTLY_UNKNOWN = 0.5  # a text is said to be unreadable above this share of unknown characters


def mostly_unknown(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[float | None]:
    """Per text: None when the tokenizer knows most of it, else the share of its non-space
    characters it reads as [UNK] (over :data:`MOSTLY_UNKNOWN`), so a command can say so.

    WordPiece turns a whole word with one unknown character into a single [UNK], so a text of
    emoji becomes one token and the model reads the reference image alone; counting characters
    (through the offsets) says how much of what the user wrote was lost. A tokenizer without
    offsets counts tokens instead.
    """
    unk = tokenizer.unk_token_id
    fast = tokenizer.is_fast
    enc = tokenizer(list(texts), return_special_tokens_mask=True, return_offsets_mapping=fast)
    shares = []
    for i, text in enumerate(texts):
        ids = enc["input_ids"][i]
        if fast:
            offsets = zip(ids, enc["offset_mapping"][i], strict=True)
            lost = sum(_written(text[a:b]) for t, (a, b) in offsets if t == unk)
            written = _written(text)
        else:
            words = [t for t, s in zip(ids, enc["special_tokens_mask"][i], strict=True) if not s]
            lost, written = sum(t == unk for t in words), len(words)
        shares.append(lost / written if written else 0.0)
    return [share if share > MOSTLY_UNKNOWN else None for share in shares]


def _written(text: str) -> int:
    """How many characters of ``text`` are not white space."""
    return len("".join(text.split()))


def describe_unknown(share: float) -> str:
    """A user-facing sentence for a text that is mostly unknown to the tokenizer."""
    return (
        f"{share:.0%} of the text is unknown to the model's tokenizer (read as [UNK]: emoji, "
        "symbols or a script its vocabulary lacks), so the search ranks by the reference image "
        "almost alone; write the change in words"
    )


def describe_cut(text: str, kept: str, shown: int = 60) -> str:
    """A user-facing sentence on where a text was cut: the last words the model read."""
    tail = kept[-shown:].lstrip()
    more = "..." if len(kept) > shown else ""
    return (
        f'the text is longer than the model reads: it was cut after "{more}{tail}" '
        f"({len(kept):,} of its {len(text):,} characters read, the rest ignored)"
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in ``folder`` (ours or a BLIP-2 / BERT download), offline.

    The class is the one ``AutoTokenizer`` would pick (:func:`tokenizer_class`), found without
    ``AutoTokenizer``: on a CSMCIR folder (``model_type: csmcir``, unknown to transformers) it
    printed a spurious "model of type csmcir" warning on every load.
    """
    folder = Path(folder)
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    if missing:
        raise DataError(f"tokenizer files missing in {folder}: {', '.join(missing)}")
    tokenizer = tokenizer_class(folder).from_pretrained(str(folder), local_files_only=True)
    check_tokenizer(tokenizer, str(folder))
    return tokenizer


def tokenizer_class(folder: Path) -> type[PreTrainedTokenizerBase]:
    """The class ``AutoTokenizer`` would load ``folder`` with.

    In order: the ``tokenizer_class`` of ``tokenizer_config.json`` (what ``save_pretrained`` and
    ``Blip2Processor`` write); the tokenizer of the ``model_type`` in the folder's
    ``config.json`` (the hub's ``google-bert/bert-base-uncased`` names no class: its
    ``tokenizer_config.json`` is only ``{"do_lower_case": true, "model_max_length": 512}``);
    BERT for a bare WordPiece ``vocab.txt``. The generic ``TokenizersBackend`` is the last
    resort: it knows no special-token roles, so a BERT folder loaded with it has no [CLS].
    """
    settings = read_json(folder / "tokenizer_config.json", "tokenizer config")
    name = settings.get("tokenizer_class") if isinstance(settings, dict) else None
    where = f"{folder / 'tokenizer_config.json'} names tokenizer_class {name!r}"
    if name is None:
        model = (
            read_json(folder / "config.json", "model config")
            if (folder / "config.json").is_file()
            else {}
        )
        model_type = model.get("model_type") if isinstance(model, dict) else None
        # blip-2's entry is its language model's tokenizer, not the Q-Former's BERT
        if model_type != "blip-2" and TOKENIZER_MAPPING_NAMES.get(model_type):
            name = TOKENIZER_MAPPING_NAMES[model_type]
            where = f"{folder / 'config.json'}: model_type {model_type!r} has tokenizer {name!r}"
        elif (folder / "vocab.txt").is_file():
            return BertTokenizer
        else:
            return TokenizersBackend
    cls = tokenizer_class_from_name(name)
    if cls is None:
        raise DataError(f"{where}, which this transformers does not have")
    return cls


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """The fused pass needs [CLS] first and a pad token; refuse a tokenizer without them."""
    if tokenizer.pad_token_id is None or tokenizer.cls_token_id is None:
        raise DataError(f"tokenizer from {where} lacks a [PAD] or [CLS] token")
    first = tokenizer("a")["input_ids"][0]
    if first != tokenizer.cls_token_id:
        raise DataError(f"tokenizer from {where} does not start encodings with [CLS]")


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer's words must all have a row in the Q-Former's ``vocab_size`` embeddings.

    Tokens added after the vocabulary may lie beyond it: ``Blip2Processor`` adds ``<image>``
    after BERT + ``[DEC]`` (30,523 rows), for generation models that strip it before the
    Q-Former. :func:`clamp_ids` turns such an id into ``[UNK]`` should a text contain one.
    """
    base = tokenizer.vocab_size
    if base > vocab_size:
        raise ConfigError(
            f"tokenizer has a vocabulary of {base} tokens but the Q-Former's vocab_size is "
            f"{vocab_size}: it belongs to another model"
        )
    special = {"[CLS]": tokenizer.cls_token_id, "[PAD]": tokenizer.pad_token_id}
    special |= {"[SEP]": tokenizer.sep_token_id, "[UNK]": tokenizer.unk_token_id}
    beyond = [f"{t} ({i})" for t, i in special.items() if i is not None and i >= vocab_size]
    if beyond:
        raise ConfigError(
            f"tokenizer ids beyond the Q-Former's vocab_size {vocab_size}: {', '.join(beyond)}"
        )


def clamp_ids(input_ids: torch.Tensor, vocab_size: int, unk_id: int) -> torch.Tensor:
    """Ids the embeddings lack (added tokens such as ``<image>`` written in a text) -> [UNK]."""
    beyond = input_ids >= vocab_size
    return input_ids.masked_fill(beyond, unk_id) if beyond.any() else input_ids


class TokenMemo:
    """Token ids by text, remembered, padded into batches as the tokenizer's own call pads them.

    Training reads the same texts every epoch, and the tokenizer's batch call cost the tiny
    preset 6-8 ms per 64 captions on the 2-core machine (the Rust WordPiece alone 6), several
    percent of a training step. Looking the ids up instead gives the same tensors. At most
    ``size`` texts are kept; past that the memo starts afresh (a demo sees endless new queries).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, size: int = 1 << 17
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.size = size
        self.ids: dict[str, tuple[int, ...]] = {}

    def __call__(
        self, texts: Sequence[str], pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[B, L]``: L is the longest text's length, or
        ``pad_to`` (padding to a fixed length, as CLIP's text tower reads)."""
        rows = [self._ids(text) for text in texts]
        width = pad_to or max(map(len, rows))
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids, mask = [], []
        for row in rows:
            fill = width - len(row)
            ids.append((pad,) * fill + row if left else row + (pad,) * fill)
            ones = (1,) * len(row)
            mask.append((0,) * fill + ones if left else ones + (0,) * fill)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def _ids(self, text: str) -> tuple[int, ...]:
        ids = self.ids.get(text)
        if ids is None:
            if len(self.ids) >= self.size:
                self.ids.clear()
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
            ids = self.ids[text] = tuple(encoded["input_ids"])
        return ids
