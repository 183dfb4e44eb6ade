"""No argument is dropped: an option the chosen path does not read is an error naming its reader."""

from __future__ import annotations

import pytest

from csmcir.cli import main as csmcir_main
from csmcir.errors import ConfigError
from csmcir.model import CSMCIR
from csmcir.model.features_cli import load_model
from csmcir.train.module import CSMCIRModule, check_init_preset


def test_weights_given_to_a_random_preset_are_refused(tmp_path, capsys) -> None:
    """It trained the 340K-parameter tiny preset from random weights and exited 0."""
    argv = ["fit", "--config", "synthcir", "--data.root", str(tmp_path / "none")]
    assert csmcir_main([*argv, "--model.weights", "Salesforce/blip2-itm-vit-g"]) == 2
    err = capsys.readouterr().err
    assert "preset 'tiny' is random-initialised and reads no weights" in err
    assert "Salesforce/blip2-itm-vit-g (--model.weights) would be ignored" in err
    assert "blip2-vitg" in err and not (tmp_path / "none").exists()
    with pytest.raises(ConfigError, match="reads no weights"):
        CSMCIR.from_preset("tiny", tokenizer_corpus=["a red circle"], weights=tmp_path)


def test_init_from_refuses_the_options_only_a_preset_reads(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        CSMCIRModule(init_from=tmp_path, weights=tmp_path, vocab_size=512)
    message = str(err.value)
    assert f"--model.weights {tmp_path}, --model.vocab_size 512 would be ignored" in message
    CSMCIRModule(init_from=tmp_path)  # the defaults are not "given"
    CSMCIRModule(init_from=tmp_path, preset="blip2-vitg")  # a packaged config's: checked later
    tiny = CSMCIR.from_preset("tiny", tokenizer_corpus=["a red circle"])
    check_init_preset(tmp_path, tiny, "tiny")
    with pytest.raises(
        ConfigError, match=r"holds a 'tiny' model, but --model\.preset is 'blip2-vitg'"
    ):
        check_init_preset(tmp_path, tiny, "blip2-vitg")


def test_features_weights_need_a_preset(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--weights .* is read only with a preset"):
        load_model(str(tmp_path), tmp_path)


def test_caption_options_of_another_backend_are_refused(tmp_path, capsys) -> None:
    argv = ["caption", "run", "--benchmark", "synthcir", "--root", str(tmp_path)]
    argv += ["--split", "val", "--out", str(tmp_path / "caps"), "--backend", "oracle"]
    assert csmcir_main([*argv, "--model-dir", "Qwen/Qwen2-VL-2B-Instruct", "--dtype", "float16"])
    err = capsys.readouterr().err
    assert "--backend oracle does not read --model-dir (read by --backend hf)" in err
    assert "--dtype (read by --backend hf)" in err and not (tmp_path / "caps").exists()
