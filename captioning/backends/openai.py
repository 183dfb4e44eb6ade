"""The ``openai`` backend: any OpenAI-compatible ``/v1/chat/completions`` server, asynchronously.

vLLM, SGLang, Ollama and LM Studio all serve this protocol. Images travel as base64 data URLs.
``concurrency`` requests are in flight at once (the runner's workers), which is what makes very
large galleries practical: a served model batches concurrent requests itself.

Each request is retried with exponential backoff and jitter on 429 (honouring ``Retry-After``),
on 5xx, on a timeout, on a broken connection and on a response body that is not the protocol's
JSON. After ``http_retries`` retries the image is recorded as a failure with the last reason.
Errors that no retry can fix stop the whole run with a message instead of failing every image:
an unreachable server at start-up or later, and 401/403/404 (wrong key, URL or model name).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from csmcir.data.images import open_image
from csmcir.errors import ConfigError, CsmcirError, DataError

SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
FATAL_STATUS = {401: "check --api-key-env", 403: "check --api-key-env", 404: "check --base-url"}


def image_data_url(path: Path) -> str:
    """The image as a data URL: PNG/JPEG/WebP/GIF bytes as they are, other formats as PNG."""
    data = path.read_bytes()
    with open_image(io.BytesIO(data), path) as img:
        fmt = img.format
        if fmt in SENT_AS_IS:
            img.verify()
            mime = SENT_AS_IS[fmt]
        else:
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def completion_text(body: str) -> tuple[str, bool]:
    """The answer text of a chat-completion body and whether it stopped at the token limit."""
    try:
        obj = json.loads(body)
        choice = obj["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat-completion response ({type(e).__name__}: {e})") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return (content or ""), choice.get("finish_reason") == "length"


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 120.0,
        http_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        retry_temperature: float = 0.7,
        json_mode: bool = False,
    ) -> None:
        if concurrency < 1 or http_retries < 0 or timeout <= 0:
            raise ConfigError("--concurrency >= 1, --http-retries >= 0 and --timeout > 0, please")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency = concurrency
        self.timeout = timeout
        self.http_retries = http_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry_temperature = retry_temperature
        self.json_mode = json_mode
        self._session: aiohttp.ClientSession | None = None

    @property
    def model(self) -> str:
        return self.model_name

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def __aenter__(self) -> OpenAIBackend:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers=self.headers,
        )
        try:
            await self._check_server()
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _check_server(self) -> None:
        """Fail fast on a wrong URL, key or model name, before thousands of requests fail."""
        url = f"{self.base_url}/models"
        try:
            async with self._session.get(url) as resp:
                body = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ConfigError(f"cannot reach the server at {self.base_url}: {e}") from None
        if status in (401, 403):
            raise ConfigError(
                f"{url}: HTTP {status}, the server refused the key; check --api-key-env"
            )
        if status != 200:
            return  # not every server lists its models; the first request will tell
        try:
            served = [m["id"] for m in json.loads(body)["data"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            return
        if served and self.model_name not in served:
            raise ConfigError(
                f"the server at {self.base_url} does not serve --model {self.model_name!r}; "
                f"it serves: {', '.join(served[:10])}"
            )

    def _payload(self, request: Request, image_url: str) -> dict[str, Any]:
        prompt = request.spec.render()
        payload: dict[str, Any] = {
            "model": self.model_name,
            "messages": [
                {"role": "system", "content": prompt.system},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": prompt.user},
                    ],
                },
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature if request.attempt == 0 else self.retry_temperature,
        }
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        return payload

    async def generate(self, requests: Sequence[Request]) -> list[Answer | BackendFailure]:
        return [await self._one(request) for request in requests]

    def _delay(self, retry: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * 2**retry) * random.uniform(0.5, 1.0)

    async def _one(self, request: Request) -> Answer | BackendFailure:
        try:
            image_url = await asyncio.to_thread(image_data_url, request.image_path)
        except DataError as e:  # not an image, or over the pixel limit: named by open_image
            return BackendFailure(str(e))
        except (OSError, SyntaxError, ValueError) as e:
            return BackendFailure(f"unreadable image {request.image_path}: {e}")
        payload = self._payload(request, image_url)
        url = f"{self.base_url}/chat/completions"
        reason = ""
        for retry in range(self.http_retries + 1):
            retry_after, refused = None, False
            try:
                async with self._session.post(url, json=payload) as resp:
                    body = await resp.text()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except TimeoutError:
                reason = f"no answer within --timeout {self.timeout:g} s"
            except aiohttp.ClientConnectorError as e:
                reason, refused = f"cannot connect: {e}", True
            except aiohttp.ClientError as e:
                reason = f"connection broken: {type(e).__name__}: {e}"
            else:
                if status == 200:
                    try:
                        text, cut = completion_text(body)
                    except ValueError as e:
                        reason = f"malformed response body: {e}"
                    else:
                        return Answer(text, truncated=cut)
                elif status in FATAL_STATUS:
                    raise ConfigError(
                        f"{url}: HTTP {status} ({body[:200].strip()}); {FATAL_STATUS[status]} "
                        f"and --model"
                    )
                elif status == 429 or status >= 500:
                    reason = f"HTTP {status}: {body[:200].strip()}"
                else:
                    return BackendFailure(f"HTTP {status}: {body[:300].strip()}")
            if retry < self.http_retries:
                await asyncio.sleep(self._delay(retry, retry_after))
        if refused:
            raise CsmcirError(
                f"lost the server at {self.base_url} ({reason}); rerun the same command to "
                f"resume once it is back"
            )
        return BackendFailure(f"{reason} (after {self.http_retries + 1} tries)")
