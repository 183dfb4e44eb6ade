"""The JSONL caption store (shards, locks, torn lines, resumption) and merging into one file."""

from __future__ import annotations

import json

import pytest

from captioning.merge import merge_folder
from captioning.parsing import Caption
from captioning.store import CaptionStore, Shard, failure_record, ok_record, read_shard
from csmcir.data.captions import load_captions
from csmcir.errors import ConfigError, DataError

V, M = "synthetic/mcot-r1/global/w25", "oracle(noise=0,seed=0)"


def ok(image_id: str, text: str = "a red circle top left") -> dict:
    return ok_record(image_id, Caption(text, {"global": "one circle"}), V, M, 1)


def failed(image_id: str, reason: str = "empty answer") -> dict:
    return failure_record(image_id, [reason], V, M, raw="")


def test_shard_parsing_and_partition():
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("4/4", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            Shard.parse(bad)
    ids = [f"img-{i}" for i in range(2000)]
    owned = [[i for i in ids if Shard(k, 4).owns(i)] for k in range(4)]
    assert sorted(i for part in owned for i in part) == sorted(ids)  # each id in exactly one
    assert all(400 < len(part) < 600 for part in owned)


def test_records_persist_and_rerun_skips_done_ids(tmp_path):
    with CaptionStore(tmp_path) as store:
        store.append(ok("a"))
        store.append(failed("b"))
    with CaptionStore(tmp_path) as store:
        assert set(store.records) == {"a", "b"}
        assert store.pending(["a", "b", "c"]) == ["c"]
        assert store.pending(["a", "b", "c"], retry_failed=True) == ["b", "c"]
        assert not store.repaired


def test_a_torn_last_line_is_cut_and_its_image_redone(tmp_path):
    with CaptionStore(tmp_path) as store:
        store.append(ok("a"))
        store.append(ok("b"))
    path = store.path
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 25])  # killed in the middle of writing "b"
    records, torn = read_shard(path)
    assert torn and [r["image_id"] for r in records] == ["a"]
    with CaptionStore(tmp_path) as store:
        assert store.repaired
        assert store.pending(["a", "b"]) == ["b"]
        store.append(ok("b"))
    assert [json.loads(line)["image_id"] for line in path.read_text().splitlines()] == ["a", "b"]


@pytest.mark.parametrize("bad", ["{oops", json.dumps({"image_id": "b", "status": "ok"})])
def test_a_corrupt_line_inside_a_shard_is_named_with_the_step_that_recovers(tmp_path, bad):
    with CaptionStore(tmp_path) as store:
        store.append(ok("a"))
    store.path.write_text(store.path.read_text() + bad + "\n" + json.dumps(ok("c")) + "\n")
    with pytest.raises(DataError, match=r"shard-0000-of-0001\.jsonl, line 2: ") as refused:
        CaptionStore(tmp_path).__enter__()
    assert "Delete that line (or the whole shard file) and run the same" in str(refused.value)
    lines = store.path.read_text().splitlines()  # the advice, followed
    store.path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with CaptionStore(tmp_path) as store:
        assert store.pending(["a", "b", "c"]) == ["b"]


def test_records_are_checked_before_they_are_written(tmp_path):
    with CaptionStore(tmp_path) as store:
        with pytest.raises(DataError, match="no Final_Caption"):
            store.append(dict(ok("a"), Final_Caption="  "))
        with pytest.raises(DataError, match="status"):
            store.append(dict(ok("a"), status="maybe"))
    assert store.path.read_text() == ""


def test_one_writer_per_shard(tmp_path):
    with CaptionStore(tmp_path, Shard(0, 2)):
        with pytest.raises(ConfigError, match="another running process"):
            CaptionStore(tmp_path, Shard(0, 2)).__enter__()
        with CaptionStore(tmp_path, Shard(1, 2)) as other:
            other.append(ok("x"))


def test_every_shard_sees_the_others_records(tmp_path):
    ids = [f"i{k}" for k in range(20)]
    with CaptionStore(tmp_path, Shard(0, 1)) as store:
        for i in ids[:10]:
            store.append(ok(i))
    with CaptionStore(tmp_path, Shard(1, 3)) as store:  # resharded rerun
        assert set(store.pending(ids)) == {i for i in ids[10:] if Shard(1, 3).owns(i)}


def test_settings_are_pinned_per_folder(tmp_path):
    with CaptionStore(tmp_path) as store:
        store.check_settings(V, M, ["a", "b"])
        store.append(ok("a"))
        store.check_settings(V, M, ["a", "b"])
        with pytest.raises(ConfigError, match="prompt_version"):
            store.check_settings("synthetic/plain-r1/none/w25", M, ["a", "b"])
        with pytest.raises(ConfigError, match="model"):
            store.check_settings(V, "hf:other", ["a", "b"])
        with pytest.raises(ConfigError, match="another image set"):
            store.check_settings(V, M, ["a", "b", "c"])


def test_merge_round_trips_through_load_captions_and_reports_failures(tmp_path):
    folder = tmp_path / "shards"
    with CaptionStore(folder, Shard(0, 2)) as store:
        store.check_settings(V, M, ["a", "b", "c", "d"])
        store.append(ok("a", "a red circle top left"))
        store.append(failed("b", "empty answer"))
    with CaptionStore(folder, Shard(1, 2)) as store:
        store.append(failed("c", "HTTP 500 (after 6 tries)"))
        store.append(ok("d", "a blue square center"))
        store.append(ok("c", "a green cross center"))  # --retry-failed succeeded
    out = tmp_path / "captions.json"
    report = merge_folder(folder, out)
    assert load_captions(out) == {
        "a": "a red circle top left",
        "c": "a green cross center",
        "d": "a blue square center",
    }
    merged = json.loads(out.read_text())
    assert list(merged) == ["a", "c", "d"]  # the manifest's order
    assert merged["a"] == {
        "levels": {"global": "one circle"},
        "Final_Caption": "a red circle top left",
        "prompt_version": V,
        "model": M,
    }
    failures = json.loads((tmp_path / "captions.failures.json").read_text())
    assert list(failures) == ["b"] and failures["b"]["reason"] == "empty answer"
    assert report.captions == 3 and list(report.failures) == ["b"] and report.shards == 2
    assert "b: empty answer (1 attempt(s))" in report.summary()


def test_merge_refuses_a_partial_store_unless_asked(tmp_path):
    with CaptionStore(tmp_path / "s") as store:
        store.check_settings(V, M, ["a", "b", "c"])
        store.append(ok("a"))
    with pytest.raises(DataError, match=r"2 of 3 images .* no caption record yet \(first: b, c\)"):
        merge_folder(tmp_path / "s", tmp_path / "m.json")
    report = merge_folder(tmp_path / "s", tmp_path / "m.json", allow_partial=True)
    assert report.missing == ["b", "c"] and "WARNING: 2 image(s)" in report.summary()
    assert load_captions(tmp_path / "m.json") == {"a": "a red circle top left"}


def test_merge_refuses_mixed_settings_and_tolerates_a_torn_tail(tmp_path):
    with CaptionStore(tmp_path / "s") as store:
        store.append(ok("a"))
        store.append(dict(ok("b"), model="hf:other"))
    with pytest.raises(ConfigError, match="mixes"):
        merge_folder(tmp_path / "s", tmp_path / "m.json")
    with CaptionStore(tmp_path / "t") as store:
        store.append(ok("a"))
    with store.path.open("a") as f:
        f.write('{"image_id": "b", "sta')
    report = merge_folder(tmp_path / "t", tmp_path / "m.json", allow_partial=True)
    assert report.torn == [store.path] and report.captions == 1


def test_merge_names_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        merge_folder(tmp_path / "nope", tmp_path / "m.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no caption shards"):
        merge_folder(tmp_path / "empty", tmp_path / "m.json")
