"""Raw error paths turned into one message that names the file or flag and how to go on
(issue 23): errors from DataLoader workers, outputs checked before work, ports in use,
interrupted runs, empty splits."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest

from csmcir.cli import main as csmcir_main


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthcir")
    args = ["data", "synth", "--out", str(root), "--train-refs", "4", "--val-refs", "4"]
    assert csmcir_main([*args, "--test-refs", "2"]) == 0
    return root


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("csmcir ")]


def test_a_worker_error_is_the_same_one_message_as_in_the_main_process(
    tiny_synth, tmp_path, capsys
):
    root = tmp_path / "synthcir"
    shutil.copytree(tiny_synth, root)
    image = sorted((root / "val").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])  # truncated
    said = []
    for workers in ("0", "1"):
        argv = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", str(root)]
        argv += ["--empty-captions", "--no-cache", "--workers", workers, "--device", "cpu"]
        assert csmcir_main([*argv, "--out", str(tmp_path / f"eval{workers}.json")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "worker process" not in err
        said.append(error_lines(err))
    assert said[0] == said[1]
    assert len(said[0]) == 1 and f"unreadable image {image}" in said[0][0]


@pytest.fixture(scope="module")
def tiny_index(tiny_synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    argv = ["index", "build", "--model", "tiny", "--benchmark", "synthcir", "--root"]
    argv += [str(tiny_synth), "--split", "test", "--empty-captions", "--no-cache"]
    assert csmcir_main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    return out


def search(index: Path, root: Path, grid: Path) -> list[str]:
    ref = sorted((root / "test").glob("*.png"))[0]
    argv = ["search", "--index", str(index), "--ref", str(ref), "--text", "make it red"]
    return [*argv, "-k", "3", "--device", "cpu", "--grid", str(grid)]


def test_a_grid_folder_that_cannot_be_made_is_refused_before_the_search(
    tiny_synth, tiny_index, tmp_path, capsys
):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where the grid's folder would go\n")
    grid = blocker / "grids" / "g.png"
    assert csmcir_main(search(tiny_index, tiny_synth, grid)) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before searching, not after printing the results
    (line,) = error_lines(err)
    assert f"--grid {grid}: its folder {grid.parent} cannot be made, {blocker} is a file" in line


def test_a_grid_name_of_another_format_is_refused_and_png_is_png(
    tiny_synth, tiny_index, tmp_path, capsys
):
    jpg = tmp_path / "grid.jpg"
    assert csmcir_main(search(tiny_index, tiny_synth, jpg)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--grid {jpg} ends in '.jpg'" in line and "end the name in .png" in line
    assert not jpg.exists()
    png = tmp_path / "grid.png"
    assert csmcir_main(search(tiny_index, tiny_synth, png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_demo_port_in_use_is_named_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # the index does not exist: the port is checked first, so the port is what is named
        argv = ["demo", "--index", str(tmp_path / "index"), "--port", str(port)]
        assert csmcir_main([*argv, "--device", "cpu"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--port {port}: cannot serve on 127.0.0.1:{port}" in line
    assert "Pass another --port" in line and "GRADIO_SERVER_PORT" not in line


def lightning_interrupted(*_args, **_kwargs):
    """What Lightning does on Ctrl+C during fit: its own shutdown, then sys.exit(1)."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


@pytest.mark.parametrize(
    ("stage", "stop"),
    [
        ("csmcir.data.synth.write_images", KeyboardInterrupt),
        ("csmcir.quickstart.make_data", lightning_interrupted),
    ],
)
def test_an_interrupted_quickstart_says_the_command_that_goes_on(stage, stop, tmp_path, capsys):
    argv = ["quickstart", "--size", "small", "--root", str(tmp_path / "data")]
    argv += ["--run-dir", str(tmp_path / "run")]
    with patch(stage, side_effect=stop):
        assert csmcir_main(argv) == 130
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (
        "csmcir quickstart: interrupted; the stages it finished are kept. To go on, run the "
        f"same command again: {shlex.join(['csmcir', *argv])}"
    )


def test_an_interrupted_caption_run_says_the_command_that_goes_on(tiny_synth, tmp_path, capsys):
    argv = ["caption", "run", "--benchmark", "synthcir", "--root", str(tiny_synth)]
    argv += ["--split", "val", "--backend", "oracle", "--out", str(tmp_path / "shards")]
    with patch("captioning.runner.run_captioning", side_effect=KeyboardInterrupt):
        assert csmcir_main(argv) == 130
    (line,) = error_lines(capsys.readouterr().err)
    assert "the captions it wrote are kept. To go on, run the same command again: " in line
    assert line.endswith(shlex.join(["csmcir", *argv]))


class RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_a_checkpoint_is_refused_in_whole_sentences(tmp_path):
    import torch

    from csmcir.errors import DataError
    from csmcir.train.export import NamedCheckpointIO, read_checkpoint

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}, evil)
    for read in (read_checkpoint, NamedCheckpointIO().load_checkpoint):
        with pytest.raises(DataError) as refused:
            read(evil)
        said = str(refused.value)
        assert said.startswith(f"checkpoint {evil} is refused: it holds a pickled Python object")
        assert said.endswith("(last.ckpt, best.ckpt)")
        assert "weights_only=False" not in said and "cut short" not in said
    assert not marker.exists()
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(DataError, match=r"is unreadable \(its pickle stream is not one torch"):
        read_checkpoint(noise)


def test_torch_load_reasons_never_stop_mid_sentence_nor_advise_unsafe_loading():
    import pickle

    from csmcir.io import torch_load_failure

    older = (  # torch 2.4's wording: its first line stops mid-sentence
        "Weights only load failed. This file can still be loaded, to do so you have two options "
        "\n\t(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed, "
        "but it can result in arbitrary code execution.\n\t(2) ...\n\tWeightsUnpickler error: "
        "Unsupported global: GLOBAL builtins.eval was not an allowed global by default."
    )
    assert torch_load_failure(pickle.UnpicklingError(older)) == (
        "it holds a pickled Python object of type builtins.eval beside its tensors",
        True,
    )
    first = "PytorchStreamReader failed reading zip archive: no end"
    assert torch_load_failure(RuntimeError(f"{first}. If you see ...")) == (first, False)


@pytest.fixture
def empty_val(tiny_synth, tmp_path) -> Path:
    """The small benchmark with ``[]`` as its val annotations."""
    root = tmp_path / "synthcir"
    shutil.copytree(tiny_synth, root)
    (root / "captions" / "cap.rc2.val.json").write_text("[]")
    return root


def test_an_empty_split_is_one_error_in_check_fit_and_eval(empty_val, tmp_path, capsys):
    said = f"synthcir/val: the annotation files under {empty_val} hold no queries (an empty list)"
    assert csmcir_main(["data", "check", "synthcir", "--root", str(empty_val)]) == 2
    out, err = capsys.readouterr()
    assert "all 3 splits complete" not in out and said in err
    argv = ["eval", "--model", "tiny", "--benchmark", "synthcir", "--root", str(empty_val)]
    argv += ["--empty-captions", "--no-cache", "--out", str(tmp_path / "e.json")]
    assert csmcir_main([*argv, "--device", "cpu"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert said in line and "--submission" not in line
    argv = ["fit", "--config", "synthcir", "--data.root", str(empty_val), "--trainer.max_steps"]
    argv += ["1", "--trainer.default_root_dir", str(tmp_path / "run"), "--data.captions"]
    assert csmcir_main([*argv, str(tmp_path / "none.json")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    # the command regenerates the benchmark as it was made, not one of the default size
    again = f"csmcir data synth --out {empty_val} --train-refs 4 --val-refs 4 --test-refs 2 "
    assert said in line and f"{again}--overwrite regenerates it" in line


def test_eval_advice_for_a_split_without_answers_is_true_for_its_benchmark():
    from csmcir.evaluation.submission import how_to_score

    assert how_to_score("cirr", "test1") == (
        "pass --submission DIR to write the files its test server scores"
    )
    synth = how_to_score("synthcir", "test")
    assert "--submission" not in synth and "synthcir has no test server" in synth
    assert synth.startswith("evaluate a split with answers (train, val)")
    assert "--submission" not in how_to_score("cirr", "train")


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a bound, not a timing test)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def killed_parent_leaves_no_workers(argv: list[str]) -> None:
    """Start ``argv``, wait until it runs a pool of workers, SIGKILL it, and check that its
    workers end within seconds rather than rendering on as orphans."""
    proc = subprocess.Popen(argv)
    workers: list[int] = []
    try:
        assert wait_for(lambda: len(children(proc.pid)) >= 2, 120), "no pool started"
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not any(alive(w) for w in workers), 10), "orphaned workers"
    finally:
        proc.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@LINUX_PROC
def test_a_killed_synth_render_leaves_no_pool_workers(tmp_path):
    out = str(tmp_path / "synth")  # the default size: rendering takes long enough to kill it
    killed_parent_leaves_no_workers([sys.executable, "-m", "csmcir", "data", "synth", "--out", out])


@LINUX_PROC
def test_the_portable_watchdog_ends_workers_of_a_killed_parent():
    """The path for systems without PR_SET_PDEATHSIG, tried here on Linux."""
    script = (
        "import time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from csmcir.workers import end_with_parent\n"
        "with ProcessPoolExecutor(2, initializer=end_with_parent, initargs=(False,)) as pool:\n"
        "    list(pool.map(time.sleep, [600, 600]))\n"
    )
    killed_parent_leaves_no_workers([sys.executable, "-c", script])


def test_dropping_every_query_is_refused_not_an_empty_split(tiny_synth, tmp_path):
    from csmcir.data.registry import load_split
    from csmcir.errors import DataError

    root = tmp_path / "synthcir"
    shutil.copytree(tiny_synth, root)
    shutil.rmtree(root / "test")  # every test image
    with pytest.raises(DataError, match="every one of its 4 queries uses one: dropping them"):
        load_split("synthcir", root, "test", drop_missing=True)


def test_captioning_all_splits_takes_the_images_of_a_split_whose_queries_are_all_dropped(
    tiny_synth, tmp_path
):
    """Captions need images, not queries: --split all with one split's images gone captions the
    others (the rehearsal's FashionIQ has images for train and val only)."""
    from captioning.targets import gallery_images
    from csmcir.data.registry import load_split

    root = tmp_path / "synthcir"
    shutil.copytree(tiny_synth, root)
    shutil.rmtree(root / "test")
    images, dropped = gallery_images("synthcir", root, "all", drop_missing=True)
    for split in ("train", "val"):
        assert set(load_split("synthcir", root, split).gallery) <= set(images)
    test_gallery = load_split("synthcir", tiny_synth, "test").gallery
    assert not set(test_gallery) & set(images) and set(test_gallery) <= set(dropped)
