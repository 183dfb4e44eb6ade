"""Every image read names the file and refuses a decompression bomb at a configurable limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from csmcir.cli import main as csmcir_main
from csmcir.data.images import MAX_PIXELS_ENV, ImageTooLargeError, load_image, verify_image
from csmcir.data.synth import SynthConfig, generate
from csmcir.errors import ConfigError, DataError

BOMB_MESSAGE = r"bomb\.png has 225\.0 megapixels, over the limit of 89\.5 megapixels"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 15000 x 15000 one-bit PNG of about 27 KB: small on disk, 225 megapixels decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (15000, 15000)).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    return path


def test_a_bomb_is_refused_before_decoding_naming_file_and_limit(bomb: Path):
    with pytest.raises(ImageTooLargeError, match=BOMB_MESSAGE) as info:
        load_image(bomb)
    assert str(bomb) in str(info.value)
    # the setting's name and a value that lets this image through
    assert f"set by ${MAX_PIXELS_ENV}" in str(info.value)
    assert f"e.g. {MAX_PIXELS_ENV}=225000000" in str(info.value)
    assert isinstance(info.value, DataError)  # the CLI prints it alone and exits 2
    assert "over the limit" in verify_image(bomb)


def test_the_pixel_limit_is_a_setting(tmp_path: Path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "199")
    wide = r"wide\.png has 20 x 10 = 200 pixels, over the limit of 199 pixels"
    with pytest.raises(ImageTooLargeError, match=wide):
        load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "200")
    assert load_image(path).size == (20, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{MAX_PIXELS_ENV} must be a positive number"):
        load_image(path)


@pytest.fixture
def synth_with_bomb(tmp_path: Path, bomb: Path) -> tuple[Path, Path]:
    root = tmp_path / "synth"
    generate(root, SynthConfig(train_refs=1, val_refs=1, test_refs=1))
    victim = sorted((root / "test").glob("*.png"))[0]
    victim.write_bytes(bomb.read_bytes())
    return root, victim


def test_data_check_names_the_bomb(synth_with_bomb, capsys):
    root, victim = synth_with_bomb
    argv = ["data", "check", "synthcir", "--root", str(root), "--split", "test"]
    assert csmcir_main(argv) == 2
    err = capsys.readouterr().err
    assert f"image {victim} has 225.0 megapixels" in err and MAX_PIXELS_ENV in err


def test_training_reads_name_the_bomb(synth_with_bomb):
    from csmcir.data.batches import ImageSource

    _, victim = synth_with_bomb
    source = ImageSource({"victim": victim}, lambda image: image)
    with pytest.raises(ImageTooLargeError, match=str(victim)):
        source["victim"]


def test_search_names_the_bomb_reference(bomb: Path, tmp_path: Path, capsys):
    argv = ["search", "--index", str(tmp_path / "none"), "--ref", str(bomb), "--text", "red"]
    assert csmcir_main(argv) == 2
    assert f"image {bomb} has 225.0 megapixels" in capsys.readouterr().err


def test_captioning_over_http_names_the_bomb(bomb: Path):
    from captioning.backends.openai import image_data_url

    with pytest.raises(ImageTooLargeError, match=BOMB_MESSAGE):
        image_data_url(bomb)
