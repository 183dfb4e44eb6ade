"""Model names: a local folder as it is, else a Hugging Face hub repo fetched into the cache.

Every argument that names a model (``--model.weights``, ``--model.init_from``, ``--model`` of
eval / index / demo, ``convert lavis --tokenizer / --vision``, the ``hf`` captioner's model, the
baseline's OpenCLIP weights) goes through :func:`resolve`, as ``from_pretrained`` does in
transformers: a path that exists is used as it is; otherwise ``org/name`` (``org/name@revision``,
or open_clip's ``hf-hub:org/name``) is fetched by ``huggingface_hub`` into its standard cache,
only the files that use reads (:data:`USES`): the tokenizer files for a tokenizer, safetensors
weights when the repo has them (else its other format, never both), the configs. The
environment is read at each call: ``HF_HUB_OFFLINE`` (the cache only), ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` or the stored login. A name that cannot be had
is one :class:`HubError` naming the repo, the files and the ``hf download`` command that
fetches them.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csmcir.errors import DataError
from csmcir.packaged import packaged_model

PREFIX = "hf-hub:"  # open_clip's spelling of a hub name
HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[\w])(?:@(?P<revision>[\w./-]+))?")
TOKENIZER_FILES = (
    "config.json",  # its model_type picks the tokenizer class when tokenizer_config names none
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
)
SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
PYTORCH_BIN = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


class HubError(DataError):
    """A model name that is not a local path and cannot be had from the hub."""


@dataclass(frozen=True)
class Use:
    """What one use of a model reads from its folder.

    Attributes:
        what: how messages name it ("BLIP-2 or CSMCIR model folder").
        files: patterns of the small files it reads (root of the repo only).
        weights: alternative weight formats, preferred first: the first one the repo has is
            fetched, and only it. Empty when the use reads no weights.
        required: files that must be there, each a tuple of alternatives.
    """

    what: str
    files: tuple[str, ...]
    weights: tuple[tuple[str, ...], ...] = ()
    required: tuple[tuple[str, ...], ...] = ()

    def choose(self, names: Sequence[str]) -> list[str]:
        """The files of a repo holding ``names`` that this use fetches."""
        root = [n for n in names if "/" not in n]
        small = [n for n in root if matches(n, self.files) and not matches(n, self.all_weights)]
        weights = [n for n in root if matches(n, self.weight_group(names))]
        return sorted(set(small + weights))

    @property
    def all_weights(self) -> tuple[str, ...]:
        return tuple(p for group in self.weights for p in group)

    def weight_group(self, names: Sequence[str] | None = None) -> tuple[str, ...]:
        """The weight format fetched from a repo holding ``names``: the first it has."""
        for group in self.weights:
            if names is None or any(matches(n, group) for n in names):
                return group
        return ()

    def missing(self, names: Sequence[str]) -> list[str]:
        """What a repo (or folder) holding ``names`` lacks for this use, said as patterns."""
        lacking = [" or ".join(a) for a in self.required if not any(matches(n, a) for n in names)]
        if self.weights and not self.weight_group(names):
            lacking.append("weights (" + " or ".join(group[0] for group in self.weights) + ")")
        return lacking

    def patterns(self, names: Sequence[str] | None = None) -> list[str]:
        """``--include`` patterns of the ``hf download`` that fetches this use's files."""
        return [*self.files, *(self.weight_group(names) or self.weight_group())]


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


MODEL = Use(
    "BLIP-2 or CSMCIR model folder",
    files=(*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json"),
    weights=(SAFETENSORS, PYTORCH_BIN),
    required=(("config.json",),),
)
TOKENIZER = Use(
    "BERT tokenizer",
    files=TOKENIZER_FILES,
    required=(("tokenizer_config.json",), ("tokenizer.json", "vocab.txt")),
)
VISION = Use(
    "BLIP-2 folder (its ViT weights)",
    files=("config.json",),
    weights=(SAFETENSORS,),
    required=(("config.json",),),
)
MLLM = Use(
    "image-text-to-text model folder",
    files=("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"),
    weights=(SAFETENSORS, PYTORCH_BIN),
    required=(("config.json",),),
)
# Weight files of an open_clip model folder, in the order open_clip itself prefers them.
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
OPEN_CLIP = Use(
    "OpenCLIP checkpoint",
    files=("open_clip_config.json",),
    weights=tuple((name,) for name in OPEN_CLIP_WEIGHTS),
)


def hub_name(name: str | Path) -> tuple[str, str | None] | None:
    """(repo, revision) when ``name`` reads as a hub name, else None."""
    text = str(name).removeprefix(PREFIX)
    found = HUB_NAME.fullmatch(text)
    return (found["repo"], found["revision"]) if found else None


def is_hub_name(name: str | Path) -> bool:
    """True when ``name`` is no local path and reads as ``org/name``: :func:`resolve` fetches it."""
    return not Path(str(name)).exists() and hub_name(name) is not None


def cache_dir() -> Path:
    """The hub cache the environment names now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve(name: str | Path, use: Use, flag: str) -> Path:
    """The local folder (or file) ``name`` stands for, fetched from the hub when it is a repo.

    ``flag`` names the argument in messages (``--model.weights``). A path that exists is
    returned as it is, then a model the package ships (``synthcir-tiny-stage1``:
    :mod:`csmcir.packaged`); a name that is none of these nor ``org/name`` is returned as a
    path, for the caller's own "not found". Raises :class:`HubError` when the repo cannot be had.
    """
    path = Path(str(name))
    if path.exists():
        return path
    if (shipped := packaged_model(str(name))) is not None:
        return shipped
    parsed = hub_name(name)
    if parsed is None:
        return path
    repo, revision = parsed
    return fetch(repo, revision, use, f"{flag} {name}")


def fetch(repo: str, revision: str | None, use: Use, said: str) -> Path:
    """``repo``'s files for ``use`` in the hub cache: downloaded, or from the cache when offline
    or when the hub cannot be reached."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = None
    if not offline():
        try:
            return download(repo, revision, use, said)
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise unavailable(repo, revision, use, said, why(e)) from None
        except HubError:
            raise
        except unreachable_errors() as e:  # the hub is down or cannot be reached: the cache
            unreachable = e
    return cached(repo, revision, use, said, unreachable)


def unreachable_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when the hub cannot be reached or answers with an error:
    its own errors are OSErrors, its HTTP client's (``httpx2``, its dependency) are not."""
    import httpx2

    return (OSError, httpx2.HTTPError)


def download(repo: str, revision: str | None, use: Use, said: str) -> Path:
    """Ask the hub what the repo holds, then fetch only what ``use`` reads."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision)
    names = [s.rfilename for s in info.siblings or []]
    lacking = use.missing(names)
    if lacking:
        reason = f"the repo has no {', '.join(lacking)}: it is not a {use.what}"
        raise unavailable(repo, revision, use, said, reason, names)
    folder = snapshot_download(
        repo,
        revision=revision,
        cache_dir=cache_dir(),
        endpoint=endpoint(),
        allow_patterns=use.choose(names),
    )
    return Path(folder)


def cached(
    repo: str, revision: str | None, use: Use, said: str, unreachable: Exception | None
) -> Path:
    """The cached snapshot of ``repo``, checked to hold what ``use`` reads."""
    from huggingface_hub import snapshot_download

    try:  # no patterns: only the snapshot's folder is wanted, its files are checked here
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache_dir(),
                local_files_only=True,
                allow_patterns=[],
            )
        )
    except OSError as e:  # not cached: huggingface_hub's LocalEntryNotFoundError and kin
        raise unavailable(repo, revision, use, said, why(unreachable or e)) from None
    lacking = use.missing([p.name for p in folder.iterdir()])
    if lacking:
        where = "HF_HUB_OFFLINE is set" if unreachable is None else why(unreachable)
        reason = f"{where}, and its cached snapshot {folder} lacks {', '.join(lacking)}"
        raise unavailable(repo, revision, use, said, reason)
    return folder


def why(error: Exception) -> str:
    """The reason a repo cannot be had, in words, from huggingface_hub's exception."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return (
            "the repo is gated: accept its terms on its hub page, then log in (`hf auth login`, "
            "or set HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{endpoint()} has no such repo, or it is private (then log in: `hf auth login`, or "
            "set HF_TOKEN)"
        )
    if isinstance(error, RevisionNotFoundError):
        return "the repo has no such revision"
    if isinstance(error, LocalEntryNotFoundError) and offline():
        return f"HF_HUB_OFFLINE is set and the hub cache {cache_dir()} holds no snapshot of it"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"the hub ({endpoint()}) cannot be reached and the cache {cache_dir()} holds no "
        f"snapshot of it ({type(error).__name__}: {first})"
    )


def download_command(repo: str, revision: str | None, use: Use, names=None) -> str:
    """The ``hf download`` command that fetches ``use``'s files of ``repo`` into the cache."""
    include = " ".join(f'--include "{p}"' for p in use.patterns(names))
    at = f" --revision {revision}" if revision else ""
    return f"hf download {repo}{at} {include}"


def local_copy_command(repo: str, use: Use, folder: str | Path) -> str:
    """The ``hf download`` command that writes ``use``'s files of ``repo`` into ``folder``."""
    return f"{download_command(repo, None, use)} --local-dir {folder}"


def unavailable(
    repo: str, revision: str | None, use: Use, said: str, reason: str, names=None
) -> HubError:
    at = f" at revision {revision}" if revision else ""
    command = download_command(repo, revision, use, names)
    return HubError(
        f"{said}: no such local path, and the hub repo {repo}{at} cannot be had: {reason}.\n"
        f"A {use.what} needs {', '.join(use.patterns(names))}. Fetch them once where the hub "
        f"is reachable:\n  {command}\n(into the hub cache, where HF_HUB_OFFLINE=1 finds them; "
        f"add --local-dir DIR and pass DIR instead for a plain folder)"
    )
