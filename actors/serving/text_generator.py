"""A policy loaded for serving: the generation engine plus the tokenizer on the way in.

Why not `model.generate`: it takes one temperature / top_p / length for the whole batch and
returns only at the end. A server decodes requests with different settings side by side and
streams text as it comes, so it runs the engine's decode loop (actors/generation/decode_loop.py)
with per-row temperature (0 means greedy), top_p, max_tokens, stop strings, seed and deadline.
This module adds what only a server needs: loading from a directory, prompts encoded under a
lock (requests arrive on the event loop while the torch thread decodes) and the context length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jinja2 import TemplateError

from rayrlhf.actors.generation.engine import LocalEngine
from rayrlhf.actors.runtime.devices import select_device, select_dtype
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.runtime.models import load_policy


def context_length(config) -> int:
    """Positions the model can attend over (prompt + completion), from its HF config."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


class TextGenerator(LocalEngine):
    """The engine over a policy directory, with text in (plain or chat) as token ids."""

    def __init__(self, model_dir: str | Path, dtype: str, torch_threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(torch_threads)
        device = select_device(device)
        keep_freed_memory(device)
        super().__init__(*load_policy(model_dir, select_dtype(dtype, device), device))
        self.context_length = context_length(self.model.config)

    def encode_text(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text).input_ids

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (else the gateway describes them in text)."""
        return "tools" in str(self.tokenizer.chat_template or "")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat template with the assistant turn opened (`tools` for a template that takes them)."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions")
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                          tokenize=False)  # fmt: skip
            except TemplateError as e:  # templates refuse some conversations (e.g. roles out of order)
                raise ValueError(f"the chat template refused these messages: {e}") from None
            return self.tokenizer(text, add_special_tokens=False).input_ids  # the template has its own
