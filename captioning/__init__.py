"""Offline multi-level chain-of-thought (MCoT) captioning of gallery images.

``csmcir caption run`` asks a backend (``oracle``, ``hf`` or ``openai``) to describe every gallery
image in levels and one final sentence, checks the answers and appends them to a resumable store;
``csmcir caption merge`` writes the caption file that training and evaluation read.
"""

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from captioning.merge import MergeReport, merge_folder
from captioning.parsing import Caption, ParseError, parse_answer
from captioning.prompts import PromptSpec, domain_for
from captioning.runner import RunSummary, caption_images, run_captioning
from captioning.store import CaptionStore, Shard

__all__ = [
    "Answer",
    "Backend",
    "BackendFailure",
    "Caption",
    "CaptionStore",
    "MergeReport",
    "ParseError",
    "PromptSpec",
    "Request",
    "RunSummary",
    "Shard",
    "caption_images",
    "domain_for",
    "merge_folder",
    "parse_answer",
    "run_captioning",
]
