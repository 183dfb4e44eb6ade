"""The ``hf`` backend: a local multimodal LLM through ``transformers``, batched.

Any model folder that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load and whose
processor has a chat template works (Qwen2-VL / Qwen2.5-VL, LLaVA, ...): a local folder, or a hub
name fetched into the hub cache by :mod:`csmcir.hub` (configs, tokenizer, chat template and one
weights format). The first attempt decodes greedily; a retry after an unusable
answer samples (``retry_temperature``) so it does not repeat the same answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from csmcir.data.images import load_image
from csmcir.errors import ConfigError, DataError
from csmcir.hub import MLLM, PREFIX, is_hub_name, local_copy_command, resolve

DTYPES = ("auto", "float32", "float16", "bfloat16")


class HFBackend(Backend):
    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 4,
        max_new_tokens: int = 384,
        retry_temperature: float = 0.7,
        seed: int = 0,
    ) -> None:
        self.name = str(model_dir).removeprefix(PREFIX)
        self.model_dir = resolve(model_dir, MLLM, "--model-dir")
        if not self.model_dir.is_dir():
            raise ConfigError(
                f"MLLM folder not found: {self.model_dir}. Give a hub name (e.g. "
                f"Qwen/Qwen2-VL-2B-Instruct, fetched into the hub cache) or a local folder:\n  "
                f"{local_copy_command('Qwen/Qwen2-VL-2B-Instruct', MLLM, self.model_dir)}"
            )
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be at least 1")
        self.dtype_name = dtype
        self.device_name = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.seed = seed
        self._calls = 0

    @property
    def model(self) -> str:
        """The hub name as given, or the local folder's name."""
        return f"hf:{self.name if is_hub_name(self.name) else self.model_dir.name}"

    async def __aenter__(self) -> HFBackend:
        await asyncio.to_thread(self.load)
        return self

    def load(self) -> None:
        """Load processor and model (``async with`` does it in a thread)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype_name
        if dtype == "auto":
            cuda = device.startswith("cuda")
            dtype = (
                "float32"
                if not cuda
                else "bfloat16"
                if torch.cuda.is_bf16_supported()
                else "float16"
            )
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.net = AutoModelForImageTextToText.from_pretrained(
                self.model_dir, dtype=self.dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"cannot load an image-text-to-text model from {self.model_dir}: {e}"
            ) from None
        if getattr(self.processor, "chat_template", None) is None:
            raise ConfigError(
                f"{self.model_dir}: the processor has no chat template (chat_template.json or "
                f"chat_template.jinja); use an instruction-tuned model folder"
            )
        self.net.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        eos = self.net.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else min(self.eos_ids, default=0)
        )

    async def generate(self, requests: Sequence[Request]) -> list[Answer | BackendFailure]:
        return await asyncio.to_thread(self.generate_batch, requests)

    def generate_batch(self, requests: Sequence[Request]) -> list[Answer | BackendFailure]:
        """Blocking generation for a batch; unreadable images become failures, not errors."""
        out: dict[int, Answer | BackendFailure] = {}
        groups: dict[bool, list[tuple[int, object]]] = {False: [], True: []}
        for i, request in enumerate(requests):
            try:
                image = load_image(request.image_path)
            except DataError as e:
                out[i] = BackendFailure(str(e))
                continue
            groups[request.attempt > 0].append((i, image))
        for sample, members in groups.items():
            if members:
                texts = self._run(
                    [requests[i] for i, _ in members], [im for _, im in members], sample
                )
                out.update({i: answer for (i, _), answer in zip(members, texts, strict=True)})
        return [out[i] for i in range(len(requests))]

    def _run(self, requests: list[Request], images: list, sample: bool) -> list[Answer]:
        import torch

        prompts = []
        for request in requests:
            prompt = request.spec.render()
            # Not every chat template accepts a system turn, so the instructions share the user's.
            content = [
                {"type": "image"},
                {"type": "text", "text": f"{prompt.system}\n\n{prompt.user}"},
            ]
            messages = [{"role": "user", "content": content}]
            prompts.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)
        options: dict = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.pad_id}
        if sample:
            self._calls += 1
            torch.manual_seed(self.seed + self._calls)
            options |= {"do_sample": True, "temperature": self.retry_temperature, "top_p": 0.95}
        else:
            options |= {"do_sample": False}
        with torch.inference_mode():
            generated = self.net.generate(**inputs, **options)
        new = generated[:, inputs["input_ids"].shape[1] :].cpu()
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        answers = []
        for row, text in zip(new.tolist(), texts, strict=True):
            stopped = any(t in self.eos_ids for t in row)
            answers.append(Answer(text, truncated=not stopped and len(row) >= self.max_new_tokens))
        return answers
