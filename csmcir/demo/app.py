"""The Gradio page of the retrieval demo: pick or upload a reference, type a text, see the top-k.

Errors a user can cause (no reference, empty text, a file that is too large or not an image)
appear in the page as a warning toast and in the status line, never as a stack trace. The
server hands out gallery images only: ``allowed_paths`` is the index's gallery folders. Uploads
live in a temporary folder of the page's own, deleted when it stops (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from csmcir.data.images import load_image
from csmcir.demo.engine import MAX_K, Result, RetrievalDemo
from csmcir.errors import CsmcirError
from csmcir.retrieval.grid import ECHOED, shorten

UPLOAD_DIR_ENV = "GRADIO_TEMP_DIR"  # where Gradio stores uploads, read when a page is built
PICKER_LIMIT = 48
NO_REFERENCE = "No reference yet: pick a gallery image or upload one."
IMAGE_PX = 200  # the reference and every result are drawn at this size, side by side
THUMB_PX = 84  # picker thumbnails: as many columns as fit, never stretched; ids under them
# Small images (the synthetic benchmark's are 64 px) are enlarged with nearest-neighbour
# sampling, so their small objects stay sharp; larger ones shrink smoothly as usual.
PAGE_CSS = f"""
.csmcir-image {{ width: {IMAGE_PX}px; height: {IMAGE_PX}px; object-fit: contain;
  image-rendering: pixelated; background: var(--background-fill-secondary);
  border-radius: var(--radius-lg); display: block; }}
.csmcir-ranked {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.csmcir-ranked figure, .csmcir-reference figure {{ margin: 0; width: {IMAGE_PX}px; }}
.csmcir-ranked figcaption {{ font-size: var(--text-sm); padding-top: 4px;
  font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }}
#picker .grid-container {{ grid-template-columns: repeat(auto-fill, {THUMB_PX}px) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important; }}
#picker .thumbnail-item {{ aspect-ratio: auto; height: auto; display: flex;
  flex-direction: column; }}
#picker .thumbnail-item > img {{ width: {THUMB_PX}px; height: {THUMB_PX}px;
  image-rendering: pixelated; }}
#picker .caption-label {{ position: static; max-width: 100%; border: 0; background: none;
  padding: 2px 0; text-align: center; }}
"""
# Gradio refuses a file over its max_file_size in the browser, before sending it, with a toast
# that vanishes and nothing else. The page hands such a file to the demo's own refusal instead
# (a hidden text box carries its name and size), so it is treated like every other bad upload.
PAGE_JS = """
() => {
  const limit = LIMIT;
  const refuse = (file, event) => {
    if (!file || file.size <= limit) return false;
    event.preventDefault();
    event.stopImmediatePropagation();
    const box = document.querySelector('#oversize textarea');
    const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
    setter.call(box, JSON.stringify({name: file.name, size: file.size, at: Date.now()}));
    box.dispatchEvent(new Event('input', {bubbles: true}));
    return true;
  };
  document.addEventListener('change', (event) => {
    const input = event.target;
    if (input.matches && input.matches('#upload input[type=file]') &&
        refuse(input.files[0], event)) input.value = '';
  }, true);
  document.addEventListener('drop', (event) => {
    if (event.target.closest && event.target.closest('#upload'))
      refuse(event.dataTransfer.files[0], event);
  }, true);
}
"""


def build_app(demo: RetrievalDemo, picker_limit: int = PICKER_LIMIT) -> gr.Blocks:
    """The page; serve it with :func:`serve` so its file rules, styles and script apply."""
    meta = demo.index.meta
    config = demo.model.config
    header = (
        "# CSMCIR composed image retrieval\n"
        f"Model `{meta['model_fingerprint'][:12]}` (tower: {config.tower}, target text: "
        f"{config.target_text}) · index of {len(demo.index)} gallery images "
        f"({meta['options']['kind']}, built from {meta.get('source', 'unknown source')})"
    )
    if note := demo.caption_note():
        header += f"\n\n**Note:** {note[0].upper()}{note[1:]}."

    def picker_items(query: str, reference: dict | None):
        matches = demo.find(query or "", len(demo.index))
        ids = matches[:picker_limit]
        count = f"{len(ids)} of {len(matches)}" if len(matches) > len(ids) else f"{len(ids)}"
        items = [(str(demo.gallery[i]), i) for i in ids]
        return (
            gr.Gallery(items, selected_index=_position(ids, reference)),
            ids,
            f"{count} matching gallery images: click one to search with it",
        )

    def pick(shown: list[str], evt: gr.SelectData):
        image_id = shown[evt.index]
        label = f"Reference: gallery image <code>{html.escape(image_id)}</code>"
        reference = {"gallery": image_id}
        path = demo.gallery_image(image_id)
        return reference, reference_html(path), label, "", "", "", gr.skip()

    def refused(message: str):
        """A failed upload: the old reference and results go, the error says why."""
        unmarked = gr.Gallery(selected_index=None)
        return None, reference_html(None), NO_REFERENCE, _error(message), "", "", unmarked

    def upload(path: str, shown: list[str]):
        try:
            image = demo.check_upload(path)
        except CsmcirError as e:
            return *refused(str(e)), None
        reference = {"upload": path}
        label = f"Reference: uploaded file <code>{html.escape(Path(path).name)}</code>"
        if same := demo.gallery_match(image):
            reference["gallery"] = same
            label += f", the same image as gallery image <code>{html.escape(same)}</code>"
        picker = gr.Gallery(selected_index=_position(shown, reference))
        return reference, reference_html(Path(path)), label, "", "", "", picker, None

    def oversize(sent: str):
        """A file the browser did not send because it is over the size limit."""
        try:
            file = json.loads(sent)
            message = demo.size_refusal(str(file["name"]), int(file["size"]))
        except (ValueError, KeyError, TypeError):
            message = f"the file is over the upload limit of {demo.max_upload_mb:g} MB"
        return refused(message)

    def search(reference: dict | None, text: str, k: float, hide_reference: bool):
        try:
            if not reference:
                raise CsmcirError(NO_REFERENCE)
            if "upload" in reference:
                image = demo.check_upload(reference["upload"])
            else:
                image = load_image(demo.gallery_image(reference["gallery"]))
            exclude = reference.get("gallery") if hide_reference else None
            results = demo.search(image, text, int(k), exclude=exclude)
        except CsmcirError as e:
            return "", "", _error(str(e))
        echoed = html.escape(shorten(text.strip(), ECHOED))
        status = f"<p>Top {len(results)} for &quot;{echoed}&quot;</p>"
        for note in (demo.unknown_note(text), demo.cut_note(text)):
            if note:
                status += f"<p><strong>Note:</strong> {html.escape(note)}</p>"
        return results_html(results), results_table(results), status

    with gr.Blocks(title="CSMCIR retrieval demo", analytics_enabled=False) as app:
        gr.Markdown(header, elem_id="header")
        reference = gr.State(None)
        shown = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                preview = gr.HTML(
                    reference_html(None), elem_classes="csmcir-reference", elem_id="reference"
                )
                reference_label = gr.HTML(NO_REFERENCE, elem_id="reference-label")
                uploader = gr.File(
                    label=f"...or upload a reference image (at most {demo.max_upload_mb:g} MB)",
                    file_count="single",
                    type="filepath",
                    elem_id="upload",
                )
                too_large = gr.Textbox(visible="hidden", elem_id="oversize")
            with gr.Column(scale=2):
                finder = gr.Textbox(
                    label="Find gallery images by id (the list follows as you type)",
                    placeholder="part of an image id, e.g. 00042",
                    elem_id="finder",
                )
                picker = gr.Gallery(
                    label="Pick a reference from the gallery",
                    show_label=False,  # its label floated over the first row of thumbnails
                    buttons=[],
                    height=300,
                    fit_columns=False,
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="picker",
                )
                picker_count = gr.Markdown(elem_id="picker-count")
        with gr.Row():
            text = gr.Textbox(
                label="Modification text",
                placeholder="e.g. make the small circle red",
                scale=4,
                elem_id="text",
            )
            k = gr.Slider(1, MAX_K, value=10, step=1, label="results (k)", scale=1)
            hide = gr.Checkbox(value=True, label="hide the reference from the results", scale=1)
        button = gr.Button("Search", variant="primary", elem_id="search")
        status = gr.HTML(elem_id="status")
        gr.Markdown("Results (rank · score · image id)")
        results = gr.HTML(elem_id="results")
        table = gr.HTML(elem_id="results-table")

        find = [finder, reference]
        app.load(picker_items, find, [picker, shown, picker_count])
        # .change, not .input: Gradio's Textbox sends .input from key handlers, a key late
        finder.change(
            picker_items,
            find,
            [picker, shown, picker_count],
            show_progress="hidden",
            trigger_mode="always_last",
        )
        # A new reference clears the results of the old one; the picker marks a gallery one.
        new_reference = [reference, preview, reference_label, status, results, table, picker]
        picker.select(pick, shown, new_reference)
        # The drop zone empties after each upload, ready for the next; the preview shows it.
        uploader.upload(upload, [uploader, shown], [*new_reference, uploader])
        too_large.change(oversize, too_large, new_reference)
        for trigger in (button.click, text.submit):
            trigger(search, [reference, text, k, hide], [results, table, status])
    return app


def _position(shown: list[str], reference: dict | None) -> int | None:
    """Where the reference's gallery image is among the picker's thumbnails (None: absent)."""
    image_id = (reference or {}).get("gallery")
    return shown.index(image_id) if image_id in shown else None


def image_url(path: Path) -> str:
    """Where the page fetches a file through Gradio's file route (gallery or upload folders)."""
    return f"gradio_api/file={quote(str(path))}"


def reference_html(path: Path | None) -> str:
    """The reference at the results' size; an empty frame of that size while there is none."""
    if path is None:
        return '<figure><div class="csmcir-image"></div></figure>'
    return f'<figure><img class="csmcir-image" src="{image_url(path)}" alt="reference"></figure>'


def results_html(results: list[Result]) -> str:
    """The ranked images, each with its rank, score and id written under it (not over it)."""
    figures = "".join(
        f'<figure><img class="csmcir-image" src="{image_url(r.path)}" '
        f'alt="{html.escape(r.image_id)}"><figcaption>#{r.rank} · {r.score:.3f} · '
        f"{html.escape(r.image_id)}</figcaption></figure>"
        for r in results
    )
    return f'<div class="csmcir-ranked">{figures}</div>'


def results_table(results: list[Result]) -> str:
    """The ranked ids and scores as an HTML table (ids are escaped: they come from files)."""
    rows = "".join(
        f"<tr><td>{r.rank}</td><td>{html.escape(r.image_id)}</td><td>{r.score:.4f}</td></tr>"
        for r in results
    )
    return (
        '<table class="csmcir-results"><thead><tr><th>rank</th><th>image id</th>'
        f"<th>score</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _error(message: str) -> str:
    """Show ``message`` as a warning toast and return it for the status line."""
    gr.Warning(message)
    return f"<p><strong>Error:</strong> {html.escape(message)}</p>"


@contextlib.contextmanager
def serve(
    demo: RetrievalDemo,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> Iterator[gr.Blocks]:
    """Serve the page in the background while the block runs (``app.local_url``;
    ``app.block_thread()`` waits), then stop it and delete every upload.

    Only the gallery folders are readable; uploads are capped server-side too. Uploads (refused
    ones included) and Gradio's copies of files go to a temporary folder of this page's own
    (``$GRADIO_TEMP_DIR`` while it runs), removed with everything in it when the page stops,
    by Ctrl+C or by SIGTERM (a plain ``kill``), instead of piling up in the system's shared
    ``gradio`` temp folder.
    """
    previous = os.environ.get(UPLOAD_DIR_ENV)
    with stop_on_sigterm(), tempfile.TemporaryDirectory(prefix="csmcir-demo-") as uploads:
        os.environ[UPLOAD_DIR_ENV] = uploads
        try:
            app = build_app(demo)
            app.queue(default_concurrency_limit=1)  # one model, one search at a time
            app.launch(
                server_name=host,
                server_port=port,
                share=False,
                allowed_paths=[str(f) for f in demo.gallery_folders()],
                max_file_size=demo.max_upload_bytes,
                prevent_thread_lock=True,
                quiet=True,
                footer_links=[],
                css=PAGE_CSS,
                js=PAGE_JS.replace("LIMIT", str(demo.max_upload_bytes)),
            )
            try:
                yield app
            finally:
                app.close()
        finally:
            if previous is None:
                os.environ.pop(UPLOAD_DIR_ENV, None)
            else:
                os.environ[UPLOAD_DIR_ENV] = previous


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` in the main thread, so the
    clean-up of every enclosing ``with`` and ``finally`` runs as it does for Ctrl+C (Python's
    default for SIGTERM is to die on the spot). Elsewhere than the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
