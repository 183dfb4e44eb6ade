"""The retrieval demo: its rules in Python (uploads, gallery files, search), then in a browser."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csmcir.cli import main as csmcir_main
from csmcir.data.captions import load_captions
from csmcir.data.images import load_image
from csmcir.data.registry import load_split
from csmcir.demo.engine import RetrievalDemo
from csmcir.errors import ConfigError, DataError
from csmcir.model import CSMCIR
from csmcir.retrieval import GalleryIndex

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def train_briefly(model: CSMCIR, root: Path, captions: dict[str, str], steps: int) -> CSMCIR:
    """A few InfoNCE steps: an untrained tiny model embeds every input almost alike."""
    from csmcir.train.loss import info_nce

    split = load_split("synthcir", root, "test")
    refs = model.preprocess([load_image(split.image_path(q.reference)) for q in split.queries])
    tgts = model.preprocess([load_image(split.image_path(q.target)) for q in split.queries])
    texts = [q.texts[0] for q in split.queries]
    target_texts = [captions[q.target] for q in split.queries]
    with torch.no_grad():
        ref_features, tgt_features = model.vision_features(refs), model.vision_features(tgts)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        q = model.encode_query(texts, vision_features=ref_features)
        t = model.encode_target(target_texts, vision_features=tgt_features)
        loss = info_nce(q @ t.T, 0.1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic test split, its oracle MCoT captions, a briefly trained tiny model and
    its index, on disk."""
    tmp = tmp_path_factory.mktemp("demo")
    root = tmp / "synth"
    synth = ["data", "synth", "--out", str(root), "--seed", "0", "--train-refs", "1"]
    assert csmcir_main([*synth, "--val-refs", "1", "--test-refs", "6"]) == 0
    caption = ["caption", "run", "--benchmark", "synthcir", "--root", str(root), "--split", "test"]
    assert csmcir_main([*caption, "--backend", "oracle", "--out", str(tmp / "shards")]) == 0
    merge = ["caption", "merge", str(tmp / "shards"), "--out", str(tmp / "captions.json")]
    assert csmcir_main(merge) == 0
    captions = load_captions(tmp / "captions.json")
    split = load_split("synthcir", root, "test")
    corpus = [q.texts[0] for q in split.queries] + list(captions.values())
    torch.manual_seed(0)
    model = CSMCIR.from_preset("tiny", tokenizer_corpus=corpus, seed=0, freeze_vision=True)
    train_briefly(model, root, captions, steps=6).save_pretrained(tmp / "model")
    build = ["index", "build", "--model", str(tmp / "model"), "--benchmark", "synthcir"]
    build += ["--root", str(root), "--split", "test", "--captions", str(tmp / "captions.json")]
    assert csmcir_main([*build, "--out", str(tmp / "index"), "--no-cache", "--device", "cpu"]) == 0
    return {"root": root, "model": tmp / "model", "index": tmp / "index", "tmp": tmp}


@pytest.fixture(scope="module")
def demo(built) -> RetrievalDemo:
    return RetrievalDemo.load(built["index"], max_upload_mb=0.05)


def brute_force(demo: RetrievalDemo, reference: Image.Image, text: str) -> list[tuple[str, float]]:
    """Every gallery image scored by encoding it directly: what the index must reproduce."""
    captions = load_captions(demo.index.meta["captions"])
    ids = demo.index.ids
    with torch.inference_mode():
        q = demo.model.encode_query([text], images=[reference])
        t = demo.model.encode_target(
            [captions[i] for i in ids], images=[load_image(demo.gallery[i]) for i in ids]
        )
    scores = (q @ t.T)[0]
    order = torch.argsort(scores, descending=True, stable=True)
    return [(ids[j], float(scores[j])) for j in order]


def test_search_matches_brute_force_and_hides_the_reference(demo):
    reference_id = demo.index.ids[4]
    reference = load_image(demo.gallery[reference_id])
    expected = brute_force(demo, reference, "make the small circle red")
    results = demo.search(reference, "  make the small circle red ", k=5, exclude=reference_id)
    kept = [(i, s) for i, s in expected if i != reference_id][:5]
    assert [r.image_id for r in results] == [i for i, _ in kept]
    np.testing.assert_allclose([r.score for r in results], [s for _, s in kept], atol=1e-5)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    assert all(r.path == demo.gallery[r.image_id] for r in results)
    shown = demo.search(reference, "make the small circle red", k=5)
    assert [r.image_id for r in shown] == [i for i, _ in expected[:5]]
    # the trained model tells images apart: scores are not all alike
    assert shown[0].score - shown[-1].score > 1e-3


def test_search_refuses_empty_text_and_k_out_of_range(demo):
    reference = load_image(demo.gallery[demo.index.ids[0]])
    with pytest.raises(ConfigError, match="type a modification text"):
        demo.search(reference, "   ")
    with pytest.raises(ConfigError, match=r"k must be within 1\.\.50, got 0"):
        demo.search(reference, "add a cube", k=0)


def test_uploads_must_be_small_decodable_images(demo, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 10), (200, 10, 10)).save(small)
    image = demo.check_upload(small)
    assert image.size == (20, 10) and image.getpixel((3, 3)) == (200, 10, 10)

    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.png is not an image this demo can read"):
        demo.check_upload(fake)

    big = tmp_path / "big.png"  # 0.05 MB limit = 52428 bytes; random pixels do not compress
    pixels = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big)
    assert big.stat().st_size > 52428
    too_big = r"big\.png is 0\.0[5-9] MB; uploads are limited to 0\.05 MB"
    with pytest.raises(DataError, match=too_big):
        demo.check_upload(big)
    with pytest.raises(ConfigError, match="--max-upload-mb must be positive"):
        RetrievalDemo(demo.model, demo.index, max_upload_mb=0)


def page_function(app, name: str):
    """The Python function behind one of the page's events."""
    return next(f.fn for f in app.fns.values() if f.name == name)


def test_a_decompression_bomb_upload_is_refused_and_clears_the_reference(demo, tmp_path):
    from csmcir.data.images import ImageTooLargeError
    from csmcir.demo.app import NO_REFERENCE, build_app

    bomb = tmp_path / "bomb.png"  # 27 KB on disk, 225 megapixels decoded
    Image.new("1", (15000, 15000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < demo.max_upload_bytes  # the size cap lets it through
    limit = r"bomb\.png has 225\.0 megapixels, over the limit of 89\.5 megapixels"
    with pytest.raises(ImageTooLargeError, match=limit):
        demo.check_upload(bomb)
    upload = page_function(build_app(demo), "upload")
    with pytest.warns(UserWarning, match="over the limit"):  # gr.Warning outside a page
        reference, preview, label, status, results, _table, picker, box = upload(str(bomb), [])
    # the previous reference is cleared, the error is in the status line, the box is free
    assert (reference, label, results, box) == (None, NO_REFERENCE, "", None)
    assert "<img" not in preview and picker.selected_index is None
    assert "bomb.png has 225.0 megapixels" in status and str(tmp_path) not in status


def test_gallery_files_folders_and_lookup(demo, built):
    test_folder = (built["root"] / "test").resolve()
    assert demo.gallery_folders() == [test_folder]
    assert set(demo.gallery) == set(load_split("synthcir", built["root"], "test").gallery)
    assert demo.find("0001", 100) == [i for i in demo.index.ids if "0001" in i]
    assert demo.find("", 3) == demo.index.ids[:3]
    with pytest.raises(DataError, match="'scenes' is not an image of this index's gallery"):
        demo.gallery_image("scenes")


def test_load_refuses_missing_images_and_a_foreign_model(built, tmp_path):
    index = GalleryIndex.load(built["index"])
    index.paths[2] = str(tmp_path / "gone.png")
    index.save(tmp_path / "index")
    with pytest.raises(DataError, match=r"1 of \d+ gallery images of the index are not on disk"):
        RetrievalDemo.load(tmp_path / "index", built["model"])
    other = CSMCIR.from_preset("tiny", tokenizer_corpus=["add a red cube"], seed=3)
    with pytest.raises(DataError, match="the index was built by model"):
        RetrievalDemo(other, GalleryIndex.load(built["index"]))
    assert csmcir_main(["demo", "--index", str(built["index"]), "--port", "0"]) == 2
    assert csmcir_main(["demo", "--index", str(tmp_path / "nowhere")]) == 2


def test_an_uploaded_copy_of_a_gallery_image_is_found_by_its_pixels(demo, tmp_path):
    image_id = demo.index.ids[7]
    copy = tmp_path / "copy.bmp"  # another format: other bytes, the same pixels
    Image.open(demo.gallery[image_id]).save(copy)
    assert copy.read_bytes() != demo.gallery[image_id].read_bytes()
    assert demo.gallery_match(demo.check_upload(copy)) == image_id
    changed = load_image(copy)
    changed.putpixel((0, 0), (255, 0, 255))
    assert demo.gallery_match(changed) is None  # one pixel off: another picture
    assert demo.gallery_match(Image.new("RGB", (7, 5))) is None  # no gallery image of its size


def test_the_page_hides_an_uploaded_gallery_image_and_marks_it_in_the_picker(demo, tmp_path):
    from csmcir.demo.app import build_app

    app = build_app(demo)
    image_id = demo.index.ids[7]
    copy = tmp_path / "copy.png"
    Image.open(demo.gallery[image_id]).save(copy)
    shown = demo.index.ids[:10]
    reference, preview, label, status, *_, picker, box = page_function(app, "upload")(
        str(copy), shown
    )
    assert reference == {"upload": str(copy), "gallery": image_id}
    assert f"the same image as gallery image <code>{image_id}</code>" in label
    assert picker.selected_index == 7 and status == "" and box is None and "<img" in preview
    search = page_function(app, "search")
    text = "make the small circle red"
    ranked = brute_force(demo, load_image(copy), text)
    for hide, expected in ((True, [i for i, _ in ranked if i != image_id][:10]), (False, None)):
        _, table, _ = search(reference, text, 10, hide)
        rows = [row.split("</td><td>")[1] for row in table.split("<tr><td>")[1:]]
        assert rows == (expected or [i for i, _ in ranked[:10]])
    # a plain upload (not in the gallery) unmarks the picker
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(other)
    reference, *_, picker, _ = page_function(app, "upload")(str(other), shown)
    assert reference == {"upload": str(other)} and picker.selected_index is None


def test_a_file_held_back_as_too_large_is_refused_like_any_bad_upload(demo):
    """The browser does not send a file over the limit; the page hands its name and size on."""
    from csmcir.demo.app import NO_REFERENCE, build_app

    oversize = page_function(build_app(demo), "oversize")
    with pytest.warns(UserWarning, match=r"big\.png is 0\.07 MB"):
        reference, preview, label, status, results, table, picker = oversize(
            json.dumps({"name": "big.png", "size": 73_400, "at": 1})
        )
    assert (reference, label, results, table) == (None, NO_REFERENCE, "", "")
    assert "<img" not in preview and picker.selected_index is None
    expected = "big.png is 0.07 MB; uploads are limited to 0.05 MB (csmcir demo --max-upload-mb)"
    assert status == f"<p><strong>Error:</strong> {expected}</p>"
    with pytest.warns(UserWarning, match="over the upload limit of 0.05 MB"):
        assert "over the upload limit" in oversize("not json")[3]


def test_the_page_says_when_the_gallery_captions_come_from_the_oracle(demo, built, tmp_path):
    from csmcir.demo.app import build_app

    note = demo.caption_note()
    assert "captions.json) were written by the oracle captioner" in note
    assert "ground truth (scenes.json), not by an MLLM" in note
    header = next(b for b in build_app(demo).blocks.values() if b.elem_id == "header")
    assert "written by the oracle captioner" in header.value
    index = GalleryIndex.load(built["index"])
    plain = tmp_path / "plain.json"  # captions that name no captioner: nothing is claimed
    plain.write_text(json.dumps({i: "a red cube" for i in index.ids}))
    for captions in (plain, tmp_path / "moved.json"):
        index.meta["captions"] = str(captions)
        assert RetrievalDemo(demo.model, index).caption_note() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uploads_are_deleted_when_the_demo_stops(demo, tmp_path):
    """Uploads (refused ones too) went to the system's shared gradio folder and stayed there."""
    import httpx

    from csmcir.demo.app import UPLOAD_DIR_ENV, serve

    before = os.environ.get(UPLOAD_DIR_ENV)
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file")  # the demo refuses it, Gradio has stored it
    with serve(demo, "127.0.0.1", free_port()) as app:
        folder = Path(os.environ[UPLOAD_DIR_ENV])
        assert folder.name.startswith("csmcir-demo-") and folder.is_dir()
        with fake.open("rb") as f:
            answer = httpx.post(f"{app.local_url}gradio_api/upload", files={"files": f})
        (stored,) = answer.json()
        assert Path(stored).is_file() and folder in Path(stored).parents
        with pytest.raises(DataError, match="not an image this demo can read"):
            demo.check_upload(stored)
    assert not folder.exists() and os.environ.get(UPLOAD_DIR_ENV) == before


@pytest.mark.slow
def test_sigterm_stops_the_demo_and_deletes_the_uploads(built, tmp_path):
    """A plain kill (SIGTERM) cleans up as Ctrl+C does; Python's default left every upload."""
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    import csmcir

    code = str(Path(csmcir.__file__).resolve().parents[1])  # the csmcir under test
    env = os.environ | {
        "TMPDIR": str(tmp_path),  # the demo's upload folder is made here
        "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])),
    }
    argv = [sys.executable, "-u", "-m", "csmcir", "demo", "--index", str(built["index"])]
    argv += ["--port", str(free_port()), "--device", "cpu"]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    guard = threading.Timer(300, proc.kill)  # a hung start fails the test instead of the run
    guard.start()
    try:
        url = next(
            (line.split()[3] for line in proc.stdout if line.startswith("demo running at")), None
        )
        assert url, f"the demo did not start: {proc.stderr.read()}"
        (folder,) = tmp_path.glob("csmcir-demo-*")
        answer = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.png", b"not png")})
        (stored,) = answer.json()
        assert folder in Path(stored).parents and Path(stored).is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        guard.cancel()
        proc.kill()
    assert not folder.exists()
    assert "Traceback" not in proc.stderr.read()


def boxes(locator) -> list[dict[str, float]]:
    """The on-screen rectangles of every element a Playwright locator matches."""
    return [element.bounding_box() for element in locator.all()]


@pytest.mark.slow
@pytest.mark.browser
def test_demo_in_a_real_browser(demo, built, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    from csmcir.demo.app import IMAGE_PX, THUMB_PX, serve

    expect.set_options(timeout=30_000)  # a busy 2-core machine renders slowly; failures still fail
    port = free_port()
    outside: list[str] = []
    shots = Path(os.environ.get("CSMCIR_DEMO_SCREENSHOTS", tmp_path))  # to look at the page
    with serve(demo, "127.0.0.1", port) as app:
        url = f"http://127.0.0.1:{port}"
        assert app.local_url.rstrip("/") == url
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url)
            expect(page.locator("#header")).to_contain_text("written by the oracle captioner")

            # every thumbnail column fits in the picker, ids written under the thumbnails
            thumbnails = page.locator("#picker img")
            expect(thumbnails).to_have_count(len(demo.index))
            picker = page.locator("#picker").bounding_box()
            thumb = thumbnails.first.bounding_box()
            assert THUMB_PX - 4 <= thumb["width"] <= THUMB_PX
            for box in boxes(thumbnails):
                assert box["x"] + box["width"] <= picker["x"] + picker["width"]
            for image, label in zip(
                boxes(thumbnails), boxes(page.locator("#picker .caption-label")), strict=True
            ):
                assert label["y"] >= image["y"] + image["height"] - 1

            # pick the 4th gallery thumbnail as the reference
            thumbnails.nth(3).click()
            reference_id = demo.index.ids[3]
            expect(page.locator("#reference-label")).to_contain_text(
                f"Reference: gallery image {reference_id}"
            )
            text = "make the *small* circle red"
            page.fill("#text textarea", text)
            page.click("#search")
            rows = page.locator("#results-table tbody tr")
            expect(rows).to_have_count(10)

            reference = load_image(demo.gallery[reference_id])
            ranked = brute_force(demo, reference, text)
            expected = [(i, s) for i, s in ranked if i != reference_id][:10]
            shown = [row.split("\t") for row in rows.all_inner_texts()]
            assert [r[0] for r in shown] == [str(n) for n in range(1, 11)]
            assert [r[1] for r in shown] == [i for i, _ in expected]
            np.testing.assert_allclose(
                [float(r[2]) for r in shown], [s for _, s in expected], atol=1e-4
            )
            # the text is echoed as typed: *small* is not markdown's italics
            expect(page.locator("#status")).to_contain_text(f'Top 10 for "{text}"')
            assert page.locator("#status em").count() == 0
            result_images = page.locator("#results img")
            expect(result_images).to_have_count(10)
            captions = page.locator("#results figcaption")
            expect(captions.first).to_have_text(f"#1 · {expected[0][1]:.3f} · {expected[0][0]}")
            # the reference and the results are drawn at one size, small images enlarged
            reference_box = page.locator("#reference img").bounding_box()
            page.screenshot(path=str(shots / "demo_search.png"), full_page=True)
            for box in [reference_box, *boxes(result_images)]:
                assert (round(box["width"]), round(box["height"])) == (IMAGE_PX, IMAGE_PX)
            assert reference.size[0] < IMAGE_PX  # the 64 px image is shown larger
            # each label sits under its image, covering none of it
            for image, label in zip(boxes(result_images), boxes(captions), strict=True):
                assert label["y"] >= image["y"] + image["height"]
                assert image["x"] <= label["x"] < image["x"] + image["width"]

            # finding by id needs no Enter, and one match stays a thumbnail
            page.locator("#finder textarea, #finder input").first.fill(reference_id[-5:])
            expect(thumbnails).to_have_count(1)
            only = thumbnails.first.bounding_box()
            assert (only["width"], only["height"]) == (thumb["width"], thumb["height"])
            expect(page.locator("#picker .thumbnail-item.selected")).to_have_count(1)
            page.locator("#finder textarea, #finder input").first.fill("")
            expect(thumbnails).to_have_count(len(demo.index))

            # a non-image upload: an error in the page, the reference cleared, no traceback
            fake = tmp_path / "holiday.png"
            fake.write_text("this is a text file")
            page.set_input_files("#upload input[type=file]", str(fake))
            message = "holiday.png is not an image this demo can read"
            expect(page.locator("#status")).to_contain_text(f"Error: {message}")
            expect(page.locator(".toast-body").first).to_contain_text(message)
            expect(page.locator("#reference-label")).to_contain_text("No reference yet")
            expect(rows).to_have_count(0)
            expect(page.locator("#picker .thumbnail-item.selected")).to_have_count(0)
            assert "Traceback" not in page.content()
            page.click("#search")
            expect(page.locator("#status")).to_contain_text("Error: No reference yet")

            # a real upload of a gallery image: the same image is hidden and marked in the picker
            image_id = demo.index.ids[7]
            uploaded = tmp_path / "mine.png"
            Image.open(demo.gallery[image_id]).save(uploaded)
            page.set_input_files("#upload input[type=file]", str(uploaded))
            expect(page.locator("#reference-label")).to_contain_text(
                f"uploaded file mine.png, the same image as gallery image {image_id}"
            )
            expect(page.locator("#status")).to_have_text("")  # the old error is gone
            expect(page.locator("#picker .thumbnail-item.selected img")).to_have_attribute(
                "alt", image_id
            )
            page.click("#search")
            expect(rows).to_have_count(10)
            own = brute_force(demo, load_image(uploaded), text)
            hidden = [i for i, _ in own if i != image_id][:10]
            assert [row.split("\t")[1] for row in rows.all_inner_texts()] == hidden
            page.screenshot(path=str(shots / "demo_upload.png"), full_page=True)

            # an upload over the size limit: refused like any bad upload, in the status line
            big = tmp_path / "big.png"
            pixels = np.random.default_rng(1).integers(0, 255, (160, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(big)
            page.fill("#text textarea", "")  # an older error first: the new one must replace it
            page.click("#search")
            expect(page.locator("#status")).to_contain_text("Error: type a modification text")
            page.set_input_files("#upload input[type=file]", str(big))
            too_big = "big.png is 0.07 MB; uploads are limited to 0.05 MB"
            expect(page.locator("#status")).to_have_text(
                f"Error: {too_big} (csmcir demo --max-upload-mb)"
            )
            expect(page.locator(".toast-body", has_text="big.png")).to_contain_text(too_big)
            expect(page.locator("#reference-label")).to_contain_text("No reference yet")
            expect(page.locator("#reference img")).to_have_count(0)
            expect(rows).to_have_count(0)
            expect(result_images).to_have_count(0)
            expect(page.locator("#picker .thumbnail-item.selected")).to_have_count(0)
            page.screenshot(path=str(shots / "demo_too_big.png"), full_page=True)

            # the server hands out gallery images and nothing else
            get = page.request.get
            assert get(f"{url}/gradio_api/file={demo.gallery[reference_id]}").status == 200
            for private in (built["model"] / "model.safetensors", built["root"] / "scenes.json"):
                assert get(f"{url}/gradio_api/file={private.resolve()}").status == 403
            browser.close()
    assert outside == []  # offline: the page asks nothing of any other host
