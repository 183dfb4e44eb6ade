"""The model's inputs: the corpus-built WordPiece tokenizer and image preprocessing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from csmcir.errors import ConfigError, DataError
from csmcir.model import CSMCIR, ImageConfig, build_wordpiece_tokenizer
from csmcir.model.config import CLIP_MEAN, CLIP_STD
from csmcir.model.tokenizer import BASE_ALPHABET, TokenMemo, load_tokenizer
from csmcir.model.transforms import ImageTransform, target_pad

CORPUS = ["make the red circle blue", "remove the red square", "the red one"]


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_wordpiece_vocabulary_is_built_from_the_corpus() -> None:
    tok = build_wordpiece_tokenizer(CORPUS)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    assert tokens(tok, "Make the RED circle") == ["[CLS]", "make", "the", "red", "circle", "[SEP]"]
    # unseen words spell out from characters instead of becoming [UNK]
    assert tokens(tok, "purple!") == ["[CLS]", "p", "##u", "##r", "##p", "##l", "##e", "!", "[SEP]"]
    # deterministic: the same corpus gives the same ids every time
    assert tok.get_vocab() == build_wordpiece_tokenizer(list(CORPUS)).get_vocab()


def test_vocab_size_keeps_the_most_frequent_words() -> None:
    chars = len(set(BASE_ALPHABET) | set("makethredcilbuosqa"))
    base = 5 + 2 * chars
    tok = build_wordpiece_tokenizer(CORPUS, vocab_size=base + 2)
    assert len(tok) == base + 2
    # 'the' and 'red' appear 3 times, every other word once
    assert tokens(tok, "the red make")[1:-1] == ["the", "red", "m", "##a", "##k", "##e"]
    with pytest.raises(ConfigError, match="below the"):
        build_wordpiece_tokenizer(CORPUS, vocab_size=base - 1)


def test_bad_corpora() -> None:
    with pytest.raises(ConfigError, match="empty"):
        build_wordpiece_tokenizer(["", "  "])
    with pytest.raises(ConfigError, match="item 1 is a int"):
        build_wordpiece_tokenizer(["ok", 3])


def test_tokenizer_round_trip_and_truncation(tmp_path) -> None:
    tok = build_wordpiece_tokenizer(CORPUS)
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert loaded("make the red circle")["input_ids"] == tok("make the red circle")["input_ids"]
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json or vocab\.txt"):
        load_tokenizer(tmp_path)
    model = CSMCIR.from_preset("tiny", tokenizer=tok, max_text_length=4)
    enc = model.tokenize(["make the red circle blue", "red"])
    # [CLS] make the [SEP]: truncated to 4, the short text padded with [PAD] = 0 and masked
    assert enc["input_ids"].tolist() == [
        tok("make the")["input_ids"],
        tok("red")["input_ids"] + [0],
    ]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(TypeError):
        model.tokenize("not a list")


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_memo_gives_the_tokenizers_own_batches(side: str) -> None:
    """Remembered ids, padded to the longest text or to the text length (CLIP's fixed one),
    are exactly what the tokenizer's batch call returns, cut texts included; past its size
    the memo starts afresh."""
    tok = build_wordpiece_tokenizer(CORPUS)
    tok.padding_side = side
    memo = TokenMemo(tok, max_length=5, size=3)
    texts = ["make the red circle blue", "red", "add a green square", "red"]
    for pad_to, padding in ((None, True), (5, "max_length")):
        own = tok(texts, padding=padding, truncation=True, max_length=5, return_tensors="pt")
        ids, mask = memo(texts, pad_to=pad_to)
        assert torch.equal(ids, own["input_ids"]) and torch.equal(mask, own["attention_mask"])
        assert mask.sum(dim=1).tolist() == [5, 3, 5, 3]
    assert ids.shape == (4, 5)
    assert len(memo.ids) == 3
    memo(["a new text"])
    assert list(memo.ids) == ["a new text"]


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_resize_mode_squashes_and_normalises() -> None:
    transform = ImageTransform(ImageConfig(size=16, mode="resize"))
    out = transform([Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("L", (16, 16), 255)])
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0, :, 5, 9], normalised((255, 0, 0)))
    torch.testing.assert_close(out[1, :, 0, 0], normalised((255, 255, 255)))  # grey -> RGB


def test_target_pad_geometry() -> None:
    square = Image.new("RGB", (100, 90), (255, 255, 255))
    assert target_pad(square, 1.25) is square  # within the ratio: untouched
    wide = target_pad(Image.new("RGB", (200, 100), (255, 255, 255)), 1.25)
    # long side / ratio = 160: 30 black rows added above and below
    assert wide.size == (200, 160)
    assert wide.getpixel((100, 10)) == (0, 0, 0) and wide.getpixel((100, 80)) == (255, 255, 255)


def test_target_pad_pipeline() -> None:
    transform = ImageTransform(ImageConfig(size=32, mode="target_pad", pad_ratio=1.25))
    out = transform([Image.new("RGB", (200, 100), (255, 255, 255))])[0]
    # padded to 200x160, short side resized to 32 (40x32), centre 32 columns kept:
    # the top 6 rows are padding, the middle is the image
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 1, 16], normalised((0, 0, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 16, 16], normalised((255, 255, 255)), atol=1e-5, rtol=0)


def test_image_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"image\.mode"):
        ImageConfig(mode="stretch")
    with pytest.raises(ConfigError, match="pad_ratio"):
        ImageConfig(pad_ratio=0.5)
