"""Tokenizer folders written file by file as the Hugging Face hub holds them.

``save_pretrained`` names the tokenizer class in ``tokenizer_config.json``; the hub's
``google-bert/bert-base-uncased`` does not (its ``tokenizer_config.json`` is only
``{"do_lower_case": true, "model_max_length": 512}``, and it has no ``special_tokens_map.json``),
so a loader tested only on re-saved folders misses how that one loads. These writers build the
files themselves, small: a WordPiece vocabulary of the given words with BERT's special tokens,
the ``tokenizer.json`` the ``tokenizers`` library serialises for it, and the hub's JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# BERT's order: [PAD] 0, unused rows, [UNK], [CLS], [SEP], [MASK] (100-103 in the real file).
SPECIALS = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NAMED = tuple(t for t in SPECIALS if not t.startswith("[unused"))
WORDS = ("make", "the", "red", "circle", "blue", "remove", "small", "green", "square", "add")
DEC = "[DEC]"


def bert_vocab(words=WORDS) -> list[str]:
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    return [*SPECIALS, *chars, *(f"##{c}" for c in chars), *words]


def tokenizer_json(vocab: list[str], added: tuple[str, ...] = ()) -> str:
    """The ``tokenizer.json`` of a lower-casing BERT WordPiece over ``vocab``, plus ``added``
    tokens after it (as BLIP-2's ``[DEC]``)."""
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    specials = [AddedToken(t, normalized=False, special=True) for t in (*NAMED, *added)]
    tok.add_special_tokens(specials)
    return tok.to_str(pretty=True)


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def bert_base_uncased_files(words=WORDS) -> dict[str, str]:
    """The text files of ``google-bert/bert-base-uncased`` (its weight files aside)."""
    vocab = bert_vocab(words)
    config = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 32,
        "pad_token_id": 0,
        "vocab_size": len(vocab),
    }
    return {
        "config.json": json.dumps(config, indent=2),
        "tokenizer.json": tokenizer_json(vocab),
        "tokenizer_config.json": json.dumps({"do_lower_case": True, "model_max_length": 512}),
        "vocab.txt": "\n".join(vocab) + "\n",
    }


def blip2_itm_tokenizer_files(words=WORDS) -> dict[str, str]:
    """The tokenizer files of ``Salesforce/blip2-itm-vit-g``: BERT with LAVIS's ``[DEC]`` added
    after the vocabulary as bos, the class named, a ``special_tokens_map.json``."""
    vocab = bert_vocab(words)
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in [
            *((vocab.index(t), t) for t in SPECIALS if "unused" not in t),
            (len(vocab), DEC),
        ]
    }
    settings = {
        "added_tokens_decoder": added,
        "bos_token": DEC,
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "never_split": None,
        "pad_token": "[PAD]",
        "processor_class": "Blip2Processor",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    }
    special_map = {
        "bos_token": DEC,
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }
    return {
        "special_tokens_map.json": json.dumps(special_map, indent=2),
        "tokenizer.json": tokenizer_json(vocab, added=(DEC,)),
        "tokenizer_config.json": json.dumps(settings, indent=2),
        "vocab.txt": "\n".join(vocab) + "\n",
    }
