"""The frozen reference policy: per-token log-probs that the KL penalty compares against."""

from __future__ import annotations

import numpy as np
import torch

from rayrlhf.actors.logprobs import first_response_column, from_numpy, token_logprobs
from rayrlhf.actors.models import load_policy
from rayrlhf.actors.trajectory import Trajectory


class ReferencePolicy:
    def __init__(self, *, model_dir: str, temperature: float, torch_threads: int, dtype: str = "float32"):
        torch.set_num_threads(torch_threads)
        self.model, _ = load_policy(model_dir, dtype=dtype)
        self.model.eval().requires_grad_(False)
        self.temperature = temperature

    def logprobs(self, traj: Trajectory) -> np.ndarray:
        """[B, T] float32, same convention as Trajectory.old_logprobs; 0 outside the response."""
        response_mask = from_numpy(traj.response_mask)
        logp = token_logprobs(
            self.model,
            from_numpy(traj.input_ids),
            from_numpy(traj.attention_mask),
            self.temperature,
            first_scored=first_response_column(response_mask),
        )
        return (logp * response_mask).float().numpy()
