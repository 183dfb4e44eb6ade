"""A Hugging Face hub endpoint on 127.0.0.1 for tests: repos built at test time, every request
logged.

It answers what ``huggingface_hub`` asks when it fetches a snapshot (``HF_ENDPOINT`` pointed
here): ``GET /api/models/{repo}[/revision/{rev}]`` (the commit and the file list),
``GET /api/models/{repo}/tree/{rev}`` (sizes and ids of every file) and ``HEAD`` / ``GET
/{repo}/resolve/{rev}/{file}`` (``X-Repo-Commit``, ``ETag``, the bytes). An unknown repo is a
404 ``RepoNotFound``, a gated one a 403 ``GatedRepo`` without a token, as the hub says them.
``requests`` lists the files downloaded, so a test can check that only the needed ones were.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    """A repo's files (name -> bytes) at one commit."""

    def __init__(self, files: dict[str, bytes], gated: bool = False) -> None:
        self.files = files
        self.gated = gated
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        self.commit = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path, extra: dict[str, bytes] | None = None, **kw) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        return cls(files | (extra or {}), **kw)

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serve ``repos`` (``"org/name" -> Repo``) in a background thread; a context manager."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloads(self, repo: str) -> set[str]:
        """The files of ``repo`` whose bytes were requested (GET of resolve)."""
        prefix = f"/{repo}/resolve/"
        return {
            path[len(prefix) :].split("/", 1)[1]
            for method, path in self.requests
            if method == "GET" and path.startswith(prefix)
        }

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads hub.requests
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # no revision: main's
            self.api(handler, "/".join(parts[2:4]), "revision", "main")
        elif parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            self.api(handler, repo_id, kind, revision)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self.resolve(handler, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self.send(handler, 404, {"error": "not found"}, code="EntryNotFound")

    def repo(self, handler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.send(handler, 404, {"error": "Repository not found"}, code="RepoNotFound")
            return None
        if repo.gated and "authorization" not in {k.lower() for k in handler.headers}:
            self.send(handler, 403, {"error": "Access to this repo is gated"}, code="GatedRepo")
            return None
        return repo

    def api(self, handler, repo_id: str, kind: str, revision: str) -> None:
        if (repo := self.repo(handler, repo_id)) is None:
            return
        if revision not in ("main", repo.commit):
            self.send(handler, 404, {"error": "Invalid rev id"}, code="RevisionNotFound")
        elif kind == "revision":
            siblings = [{"rfilename": name} for name in sorted(repo.files)]
            self.send(handler, 200, {"id": repo_id, "sha": repo.commit, "siblings": siblings})
        elif kind == "tree":
            entries = [
                {"type": "file", "oid": repo.blob_id(n), "size": len(d), "path": n}
                for n, d in sorted(repo.files.items())
            ]
            self.send(handler, 200, entries)
        else:
            self.send(handler, 404, {"error": "not found"})

    def resolve(self, handler, repo_id: str, revision: str, name: str, body: bool) -> None:
        if (repo := self.repo(handler, repo_id)) is None:
            return
        if revision not in ("main", repo.commit) or name not in repo.files:
            self.send(handler, 404, {"error": "Entry not found"}, code="EntryNotFound")
            return
        data = repo.files[name]
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", repo.commit)
        handler.send_header("ETag", f'"{repo.blob_id(name)}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def send(self, handler, status: int, payload, code: str | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if code:
            handler.send_header("X-Error-Code", code)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
