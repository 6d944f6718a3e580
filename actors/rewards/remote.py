"""A reward served elsewhere (`reward.remote`): one HTTP POST per scored batch, JSON scores back.

Request body: {"prompts": [...], "completions": [...], "references": [...], "extras": [{...}, ...]}
(one entry per row; prompts are strings or chat messages). Response: {"scores": [float | null, ...]}
or a bare JSON list, one score per row (null: not applicable). A failed call (connection error,
timeout, non-2xx status, unusable body) is retried `retries` times with a short backoff; then the
batch fails with the last error, so a step is never trained on a silently missing reward.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from rayrlhf.actors.rewards.names import REMOTE
from rayrlhf.actors.rewards.user_functions import RewardFunctionError, as_scores

if TYPE_CHECKING:
    from rayrlhf.actors.rewards.components import RewardBatch

BACKOFF_S = 0.2
"""The first retry waits this long, each next one twice as long (capped at 5 s)."""


class RemoteRewardError(RuntimeError):
    """The remote reward could not score a batch after every retry."""


def env_headers(headers_env: dict[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """{header: value} from {header: VARIABLE}; a variable that is not set is an error naming it."""
    missing = sorted(var for var in headers_env.values() if var not in environ)
    if missing:
        raise RemoteRewardError(f"reward.remote.headers_env: {', '.join(missing)} not set in this environment")
    return {header: environ[var] for header, var in headers_env.items()}


class RemoteReward:
    """A reward component (actors/rewards/components.py) named `remote`."""

    name = REMOTE

    def __init__(
        self, url: str, timeout_s: float, retries: int, weight: float = 1.0, headers: dict[str, str] | None = None,
        headers_env: dict[str, str] | None = None, max_response_bytes: int = 1 << 20,
    ) -> None:
        self.url, self.timeout_s, self.retries, self.weight = url, timeout_s, retries, weight
        self.max_response_bytes = max_response_bytes
        self.headers = {"Content-Type": "application/json", **(headers or {}), **env_headers(headers_env or {})}

    def _post(self, body: bytes, n: int) -> np.ndarray:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            data = response.read(self.max_response_bytes + 1)
        if len(data) > self.max_response_bytes:
            raise ValueError(f"the response is larger than reward.remote.max_response_bytes={self.max_response_bytes}")
        payload = json.loads(data)
        scores = payload.get("scores") if isinstance(payload, dict) else payload
        return as_scores(scores, n, f"remote reward {self.url}")

    def score(self, batch: RewardBatch) -> np.ndarray:
        """float32 scores of the batch (NaN where the server said null); raises after the last retry."""
        body = json.dumps({"prompts": batch.prompts, "completions": batch.responses,
                           "references": batch.references, "extras": batch.extras}).encode()  # fmt: skip
        errors = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 5.0))
            try:
                return self._post(body, len(batch.responses))
            except (OSError, ValueError, RewardFunctionError) as e:  # URLError, HTTPError, timeouts, bad JSON
                detail = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else f"{type(e).__name__}: {e}"
                errors.append(detail)
        raise RemoteRewardError(
            f"remote reward {self.url} failed {len(errors)} time(s) (1 try + {self.retries} retries): "
            + "; ".join(errors)
        )
