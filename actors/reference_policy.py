"""The frozen reference policy: per-token log-probs that the KL penalty compares against."""

from __future__ import annotations

import numpy as np
import torch

from rayrlhf.actors.runtime.cpu_linear import pack_linears
from rayrlhf.actors.runtime.devices import select_device, select_dtype
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.rl.logprobs import first_response_column, from_numpy, token_logprobs
from rayrlhf.actors.runtime.models import load_policy, resolve_policy_here
from rayrlhf.actors.rl.trajectory import Trajectory


class ReferencePolicy:
    def __init__(self, *, model: str, temperature: float, torch_threads: int, dtype: str = "auto",
                 device: str = "cpu", cache_dir: str | None = None, pack_tokens: int | None = None,
                 share_prompts: bool = False, logits_chunk: int = 1024):  # fmt: skip
        """pack_tokens, share_prompts, logits_chunk: as the learner's (learner.packed_row_tokens,
        learner.share_prompts and learner.logits_chunk), so both compute the same way."""
        torch.set_num_threads(torch_threads)
        self.device = select_device(device)
        keep_freed_memory(self.device)
        path = resolve_policy_here(model, cache_dir)
        self.model, _ = load_policy(path, select_dtype(dtype, self.device), self.device)
        self.model.eval().requires_grad_(False)
        pack_linears(self.model)
        self.temperature, self.pack_tokens, self.logits_chunk = temperature, pack_tokens, logits_chunk
        self.share_prompts = share_prompts

    def logprobs(self, traj: Trajectory) -> np.ndarray:
        """[B, T] float32, same convention as Trajectory.old_logprobs; 0 outside the response."""
        response_mask = from_numpy(traj.response_mask).to(self.device)
        logp = token_logprobs(
            self.model,
            from_numpy(traj.input_ids).to(self.device),
            from_numpy(traj.attention_mask).to(self.device),
            self.temperature,
            first_scored=first_response_column(response_mask),
            pack_tokens=self.pack_tokens,
            share_prompts=self.share_prompts,
            logits_chunk=self.logits_chunk,
        )
        return (logp * response_mask).float().cpu().numpy()
