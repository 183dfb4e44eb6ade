"""A local OpenAI-compatible chat-completions server with fault injection.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` on 127.0.0.1 like a served MLLM
would, after a fixed ``latency``, and can be told to misbehave per image and per try: HTTP 500,
429, an answer slower than the client's timeout, a body that is not JSON, a dropped connection, or
a well-formed completion whose text is garbage. The tests and ``bench/bench_caption_openai.py``
drive the real ``openai`` backend against it; it is also a way to try a captioning run without a
GPU. A good answer is a valid MCoT JSON whose caption names a fingerprint of the image it was
sent, so a caller can check that no answer went to the wrong image.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

BEHAVIOURS = ("ok", "500", "429", "slow", "bad_json", "drop", "garbage")

# behaviour(fingerprint, n) -> one of BEHAVIOURS for the n-th request (from 0) about that image.
Script = Callable[[str, int], str]


def image_fingerprint(data_url: str) -> str:
    """What the server calls an image: the first 10 hex digits of its data URL's SHA-1."""
    return hashlib.sha1(data_url.encode("ascii")).hexdigest()[:10]


def good_answer(fingerprint: str) -> str:
    return json.dumps(
        {
            "global": f"a test image with fingerprint {fingerprint}",
            "attributes": "flat colours",
            "details": f"fingerprint {fingerprint}",
            "Final_Caption": f"a test image with fingerprint {fingerprint}",
        }
    )


class FakeChatServer:
    """Serve in a background thread; use as a context manager, read ``base_url`` inside it."""

    def __init__(
        self,
        model: str = "fake-mllm",
        latency: float = 0.0,
        script: Script | None = None,
        slow_seconds: float = 5.0,
        api_key: str | None = None,
    ) -> None:
        self.model = model
        self.api_key = api_key
        self.latency = latency
        self.script = script or (lambda fingerprint, n: "ok")
        self.slow_seconds = slow_seconds
        self.requests: Counter[str] = Counter()
        self.last_request: dict | None = None
        self.served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if refused := self._refused(request):
            return refused
        body = await request.json()
        self.last_request = body
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": "model not found"}}, status=404)
        parts = body["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in parts if p.get("type") == "image_url")
        fingerprint = image_fingerprint(url)
        with self._lock:
            n = self.requests[fingerprint]
            self.requests[fingerprint] += 1
        behaviour = self.script(fingerprint, n)
        await asyncio.sleep(self.slow_seconds if behaviour == "slow" else self.latency)
        if behaviour == "500":
            return web.Response(status=500, text="internal error (injected)")
        if behaviour == "429":
            return web.Response(
                status=429, text="slow down (injected)", headers={"Retry-After": "0"}
            )
        if behaviour == "bad_json":
            return web.Response(
                status=200, text='{"choices": [{"message": ', content_type="application/json"
            )
        if behaviour == "drop":
            request.transport.close()
            return web.Response(status=200)
        text = "I cannot help with that." if behaviour == "garbage" else good_answer(fingerprint)
        with self._lock:
            self.served[fingerprint] += 1
        return web.json_response(
            {
                "id": f"chatcmpl-{fingerprint}-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    def __enter__(self) -> FakeChatServer:
        started = threading.Event()

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 1024**2)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._stop = asyncio.Event()
            started.set()
            await self._stop.wait()
            await runner.cleanup()

        def thread() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=thread, name="fake-chat-server", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake chat server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
