"""The model card (``README.md``) of a ``csmcir export hf`` folder, as the Hugging Face hub reads
it: a YAML metadata header (library, tags, base model, datasets, licence and a ``model-index``
of the evaluation results), then what the model is, its results and how to use it in
transformers.

The results are the ones measured on this very model: ``csmcir eval`` results files and the
quickstart's summary whose model fingerprint is the exported model's, found in the run folder,
in ``runs/eval/`` (eval's default output folder) or given with ``--results``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from csmcir.errors import DataError
from csmcir.io import read_json
from csmcir.model.registry import list_presets, load_preset
from csmcir.model.run_folder import BEST_MODEL, FINAL_MODEL, LOGS, RUN_OUTPUTS

if TYPE_CHECKING:
    from csmcir.model.encoder import CSMCIR

EVAL_FOLDER = Path("runs") / "eval"  # where `csmcir eval` writes by default
QUICKSTART_SUMMARY = Path("quickstart") / "summary.json"  # in the quickstart's run folder
TAGS = ["csmcir", "composed-image-retrieval", "image-text-retrieval", "blip-2"]
TASK_TYPE, TASK_NAME = "composed-image-retrieval", "Composed image retrieval"
BENCHMARK_NAMES = {
    "cirr": "CIRR",
    "fashioniq": "FashionIQ",
    "circo": "CIRCO",
    "shoes": "Shoes",
    "fashion200k": "Fashion200k",
    "synthcir": "SynthCIR (csmcir's synthetic benchmark)",
}

USAGE = '''```python
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

repo = "{repo}"  # this folder, or its hub name once uploaded
model = Blip2ForImageTextRetrieval.from_pretrained(repo).eval()
# backend="pil": PIL's resize, as csmcir (and LAVIS) preprocess; the default torchvision
# backend resizes slightly differently (pixel values up to 0.015 apart)
processor = AutoProcessor.from_pretrained(repo, backend="pil")
n = model.config.num_query_tokens


def embed(images, texts):
    """(image, text) pairs -> L2-normalised embeddings: the fused pass read at the text's [CLS]."""
    inputs = processor(
        images=images, text=texts, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**inputs, use_image_text_matching_head=True)
    return F.normalize(model.text_projection(out.text_model_output.last_hidden_state[:, n]), dim=-1)

{targets}
```'''

CAPTION_TARGETS = """
query = embed([Image.open("reference.jpg")], ["make the dress red and sleeveless"])
# targets are embedded by the same function, each image with its caption
targets = embed(
    [Image.open("a.jpg"), Image.open("b.jpg")], ["a red sleeveless dress", "a blue shirt"]
)
scores = query @ targets.T  # [queries, targets], higher is closer"""

IMAGE_TARGETS = """
query = embed([Image.open("reference.jpg")], ["make the dress red and sleeveless"])
# targets are images alone: transformers' ITC image embeddings, one per query token
images = [Image.open("a.jpg"), Image.open("b.jpg")]
inputs = processor(images=images, text=[""] * len(images), return_tensors="pt")
with torch.no_grad():
    targets = model(**inputs, use_image_text_matching_head=False).image_embeds  # [B, n, D]
scores = torch.einsum("qd,tkd->qtk", query, targets).amax(-1)  # the best query token"""


@dataclass(frozen=True)
class Result:
    """One benchmark split's metrics (recall and mAP in %), and the file they were read from."""

    benchmark: str  # csmcir's name: cirr, fashioniq, synthcir, ...
    config: str | None  # FashionIQ's category (or "average"); None elsewhere
    split: str
    metrics: dict[str, float]
    source: Path


def run_folder_of(model_dir: Path) -> Path | None:
    """The training run folder a model folder was exported into (``<run>/model``,
    ``<run>/best``), or None for a folder of its own."""
    run = model_dir.resolve().parent
    if model_dir.resolve().name in (FINAL_MODEL, BEST_MODEL) and any(
        (run / name).exists() for name in RUN_OUTPUTS
    ):
        return run
    return None


def fit_settings(run_dir: Path | None) -> dict[str, Any]:
    """The ``model`` and ``data`` sections of the run's last saved fit config
    (``logs/version_N/config.yaml``); empty without one."""
    import yaml

    if run_dir is None:
        return {}
    saved = sorted(
        (run_dir / LOGS).glob("version_*/config.yaml"),
        key=lambda p: int(p.parent.name.removeprefix("version_") or -1),
    )
    try:
        config = yaml.safe_load(saved[-1].read_text(encoding="utf-8")) if saved else None
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict):
        return {}
    sections = {k: config.get(k) or {} for k in ("model", "data")}
    return {k: v.get("init_args", v) for k, v in sections.items() if isinstance(v, dict)}


def base_model_of(model: CSMCIR, settings: dict[str, Any]) -> str | None:
    """The hub repository the model started from: the fit's ``model.weights`` when it is a
    hub name, else the preset's published weights; None for a random-initialised preset."""
    weights = settings.get("model", {}).get("weights")
    hub_name = isinstance(weights, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", weights)
    if hub_name and not Path(weights).exists():
        return weights
    if model.config.preset in list_presets():
        published = load_preset(model.config.preset).weights
        return published["repo"] if published else None
    return None


def _fingerprint(data: Any) -> str | None:
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("fingerprint") if isinstance(model, dict) else None


def eval_results(path: Path, data: dict[str, Any]) -> list[Result]:
    """The metrics of a ``csmcir eval`` results file (none for a submission run)."""
    found = []
    for key, metrics in data.get("metrics", {}).items():
        if not metrics:
            continue
        benchmark, _, category = key.partition("-")
        if key == "average":
            benchmark, category = data["benchmark"], "average"
        found.append(Result(benchmark, category or None, data["split"], metrics, path))
    return found


def quickstart_results(path: Path, data: dict[str, Any]) -> list[Result]:
    """The trained model's row of the quickstart's test table."""
    return [Result("synthcir", None, "test", data["table"]["trained"], path)]


def read_results(path: Path) -> tuple[str | None, list[Result]] | None:
    """(model fingerprint, results) of an eval results file or a quickstart summary; None for
    any other JSON file, a DataError naming a malformed one."""
    data = read_json(path, "results file")
    if not isinstance(data, dict):
        return None
    if {"benchmark", "split", "metrics"} <= set(data):
        return _fingerprint(data), eval_results(path, data)
    if isinstance(data.get("table"), dict) and "trained" in data["table"]:
        return _fingerprint(data), quickstart_results(path, data)
    return None


def find_results(fingerprint: str, run_dir: Path | None, given: Iterable[Path]) -> list[Result]:
    """The results measured on the model of ``fingerprint``: every ``given`` file (an error when
    one is not a results file or belongs to another model), then those found in the run
    folder, its quickstart summary and ``runs/eval/``. Of several results for one benchmark,
    split and category, the newest file's."""
    chosen: dict[tuple[str, str | None, str], Result] = {}

    def take(results: list[Result]) -> None:
        for r in results:
            key = (r.benchmark, r.config, r.split)
            if key not in chosen or r.source.stat().st_mtime > chosen[key].source.stat().st_mtime:
                chosen[key] = r

    for path in given:
        read = read_results(path)
        if read is None:
            raise DataError(f"--results {path}: not a csmcir eval results file")
        if read[0] != fingerprint:
            raise DataError(
                f"--results {path}: measured on another model (fingerprint "
                f"{str(read[0])[:12]}, the exported model's is {fingerprint[:12]})"
            )
        take(read[1])
    folders = [run_dir, EVAL_FOLDER] if run_dir else [EVAL_FOLDER]
    candidates = [p for f in folders if f.is_dir() for p in sorted(f.glob("*.json"))]
    if run_dir and (run_dir / QUICKSTART_SUMMARY).is_file():
        candidates.append(run_dir / QUICKSTART_SUMMARY)
    for path in candidates:
        try:
            read = read_results(path)
        except (DataError, UnicodeDecodeError):
            continue  # not ours to judge: only results files are read
        if read is not None and read[0] == fingerprint:
            take(read[1])
    return sorted(chosen.values(), key=lambda r: (r.benchmark, r.config or "", r.split))


def metric_id(name: str) -> str:
    """A metric's type in the model-index: ``R@10`` -> ``recall_at_10``, ``mAP@5`` ->
    ``map_at_5``, ``Rsubset@1`` -> ``recall_subset_at_1``."""
    name = name.replace("Rsubset", "recall_subset").replace("R@", "recall@")
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("@", "_at_")).strip("_")


def eval_result_entries(results: list[Result]) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=r.benchmark,
            dataset_name=BENCHMARK_NAMES.get(r.benchmark, r.benchmark),
            dataset_config=r.config,
            dataset_split=r.split,
            metric_type=metric_id(name),
            metric_name=name,
            metric_value=round(float(value), 2),
        )
        for r in results
        for name, value in r.metrics.items()
        if isinstance(value, int | float)
    ]


def results_table(results: list[Result]) -> str:
    if not results:
        return (
            "No evaluation results were found for this model (`csmcir eval` writes them; "
            "`csmcir export hf --results FILE` adds them to the card)."
        )
    columns = list(dict.fromkeys(name for r in results for name in r.metrics))
    lines = [
        "| benchmark | split | " + " | ".join(columns) + " | from |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " | --- |",
    ]
    for r in results:
        name = BENCHMARK_NAMES.get(r.benchmark, r.benchmark) + (f" {r.config}" if r.config else "")
        cells = [f"{r.metrics[c]:.2f}" if c in r.metrics else "" for c in columns]
        lines.append(f"| {name} | {r.split} | " + " | ".join(cells) + f" | `{r.source.name}` |")
    return "\n".join(lines) + "\n\nRecall and mAP in %."


def model_card(
    model: CSMCIR,
    name: str,
    results: list[Result],
    *,
    fingerprint: str,
    base_model: str | None,
    license: str,
    trained_on: str | None = None,
    notes: Iterable[str] = (),
) -> ModelCard:
    """The card of the exported ``model``, for a repository or folder called ``name``."""
    c = model.config
    datasets = list(
        dict.fromkeys([*([trained_on] if trained_on else []), *(r.benchmark for r in results)])
    )
    data = ModelCardData(
        library_name="transformers",
        tags=TAGS,
        base_model=base_model,
        datasets=datasets or None,
        license=license,
        model_name=name,
        eval_results=eval_result_entries(results) or None,
    )
    targets = "its caption" if c.target_text == "caption" else "nothing: the image alone"
    usage = USAGE.format(
        repo=name, targets=CAPTION_TARGETS if c.target_text == "caption" else IMAGE_TARGETS
    )
    body = f"""
# {name}

A composed image retrieval model trained with csmcir: a query is a reference image with a
modification text ("same dress but red and sleeveless"), and the answers are the gallery's
target images. Both sides go through one BLIP-2 Q-Former: the query is (reference image,
modification text), a target is (target image, {targets}). `csmcir export hf` wrote it as a
transformers `Blip2ForImageTextRetrieval`, whose multimodal pass read at the text's [CLS]
gives these embeddings; the export checked that on its own inputs.

| | |
| --- | --- |
| preset | `{c.preset}`{f" (from `{base_model}`)" if base_model else ""} |
| trained on | {BENCHMARK_NAMES.get(trained_on, trained_on) if trained_on else "not recorded"} |
| query tokens | {c.num_query_tokens} |
| text tokens read | {c.max_text_length}, [CLS] and [SEP] included |
| embedding | {c.embed_dim}, L2-normalised |
| parameters | {model.num_parameters():,} |
| csmcir fingerprint | `{fingerprint}` |

## Results

{results_table(results)}

## Usage in transformers

{usage}

Texts longer than {c.max_text_length} tokens are cut, as in csmcir (`truncation=True`).
"""
    notes = list(notes)
    if notes:
        body += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
