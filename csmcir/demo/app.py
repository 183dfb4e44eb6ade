"""The Gradio page of the retrieval demo: pick or upload a reference, type a text, see the top-k.

Errors a user can cause (no reference, empty text, a file that is too large or not an image)
appear in the page as a warning toast and in the status line, never as a stack trace. The
server hands out gallery images only: ``allowed_paths`` is the index's gallery folders. Uploads
live in a temporary folder of the page's own, deleted when it stops (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import html
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from csmcir.data.images import load_image
from csmcir.demo.engine import MAX_K, Result, RetrievalDemo
from csmcir.errors import CsmcirError
from csmcir.retrieval.grid import ECHOED, shorten

UPLOAD_DIR_ENV = "GRADIO_TEMP_DIR"  # where Gradio stores uploads, read when a page is built
PICKER_LIMIT = 48
NO_REFERENCE = "No reference yet: pick a gallery image or upload one."


def build_app(demo: RetrievalDemo, picker_limit: int = PICKER_LIMIT) -> gr.Blocks:
    """The page; serve it with :func:`launch` so its file rules apply."""
    meta = demo.index.meta
    config = demo.model.config
    header = (
        "# CSMCIR composed image retrieval\n"
        f"Model `{meta['model_fingerprint'][:12]}` (tower: {config.tower}, target text: "
        f"{config.target_text}) · index of {len(demo.index)} gallery images "
        f"({meta['options']['kind']}, built from {meta.get('source', 'unknown source')})"
    )

    def picker_items(query: str) -> tuple[list[tuple[str, str]], list[str], str]:
        matches = demo.find(query or "", len(demo.index))
        ids = matches[:picker_limit]
        count = f"{len(ids)} of {len(matches)}" if len(matches) > len(ids) else f"{len(ids)}"
        return [(str(demo.gallery[i]), i) for i in ids], ids, f"{count} matching gallery images"

    def pick(shown: list[str], evt: gr.SelectData):
        image_id = shown[evt.index]
        path = demo.gallery_image(image_id)
        label = f"Reference: gallery image `{image_id}`"
        return {"gallery": image_id}, str(path), label, "", [], ""

    def upload(path: str):
        try:
            image = demo.check_upload(path)
        except CsmcirError as e:
            return None, None, NO_REFERENCE, _error(str(e)), [], "", None
        label = f"Reference: uploaded file `{Path(path).name}`"
        return {"upload": path}, image, label, "", [], "", None

    def search(reference: dict | None, text: str, k: float, hide_reference: bool):
        try:
            if not reference:
                raise CsmcirError(NO_REFERENCE)
            if "gallery" in reference:
                image = load_image(demo.gallery_image(reference["gallery"]))
                exclude = reference["gallery"] if hide_reference else None
            else:
                image, exclude = demo.check_upload(reference["upload"]), None
            results = demo.search(image, text, int(k), exclude=exclude)
        except CsmcirError as e:
            return [], "", _error(str(e))
        items = [(str(r.path), f"#{r.rank} · {r.score:.3f} · {r.image_id}") for r in results]
        status = f'Top {len(results)} for "{html.escape(shorten(text.strip(), ECHOED))}"'
        note = demo.cut_note(text)
        if note:
            status += f"\n\n**Note:** {html.escape(note)}"
        return items, results_table(results), status

    with gr.Blocks(title="CSMCIR retrieval demo", analytics_enabled=False) as app:
        gr.Markdown(header)
        reference = gr.State(None)
        shown = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                preview = gr.Image(
                    label="Reference", interactive=False, height=260, elem_id="reference"
                )
                reference_label = gr.Markdown(NO_REFERENCE, elem_id="reference-label")
                uploader = gr.File(
                    label=f"...or upload a reference image (at most {demo.max_upload_mb:g} MB)",
                    file_count="single",
                    type="filepath",
                    elem_id="upload",
                )
            with gr.Column(scale=2):
                finder = gr.Textbox(
                    label="Find gallery images by id", placeholder="e.g. 00042", elem_id="finder"
                )
                picker = gr.Gallery(
                    label="Pick a reference from the gallery",
                    columns=8,
                    height=300,
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
        status = gr.Markdown(elem_id="status")
        results = gr.Gallery(
            label="Results (rank · score · image id)",
            columns=5,
            allow_preview=False,
            elem_id="results",
        )
        table = gr.HTML(elem_id="results-table")

        app.load(picker_items, finder, [picker, shown, picker_count])
        finder.submit(picker_items, finder, [picker, shown, picker_count])
        # A new reference clears the results of the old one.
        new_reference = [reference, preview, reference_label, status, results, table]
        picker.select(pick, shown, new_reference)
        # The drop zone empties after each upload, ready for the next; the preview shows it.
        uploader.upload(upload, uploader, [*new_reference, uploader])
        for trigger in (button.click, text.submit):
            trigger(search, [reference, text, k, hide], [results, table, status])
    return app


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
    return f"**Error:** {html.escape(message)}"


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
    instead of piling up in the system's shared ``gradio`` temp folder.
    """
    previous = os.environ.get(UPLOAD_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="csmcir-demo-") as uploads:
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
