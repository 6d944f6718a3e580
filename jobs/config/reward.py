"""The reward section of a run config: the built-in components, user functions and a remote scorer.
Part of the run-config schema (jobs/config/run.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rayrlhf.actors.rewards.names import RESERVED
from rayrlhf.jobs.config.base import StrictModel

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def function_name(path: str) -> str:
    """A user function's component name unless it is given one: the part after the colon."""
    return path.rsplit(":", 1)[-1].strip()


class RewardFunctionConfig(StrictModel):
    """A user reward function (actors/rewards/user_functions.py says how it is called)."""

    path: str = Field(min_length=1)
    """FILE.py:FUNCTION (relative to the working directory), MODULE:FUNCTION, or a built-in name
    (math_exact_match)."""
    weight: float = 1.0
    name: str = ""
    """Its component name in the logs (reward/<name>, eval/<name>) and in a tune search space
    (reward.functions.<name>.weight); empty (the default): the function's name."""

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """Name it, and make a file path absolute so that actors (any working directory) find it."""
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            return data
        data = dict(data)
        where, colon, fn = data["path"].rpartition(":")
        if colon and where.endswith(".py"):
            data["path"] = f"{Path(where).expanduser().resolve()}:{fn}"
        if not data.get("name"):
            data["name"] = function_name(data["path"])
        if not _NAME.fullmatch(data["name"]):
            raise ValueError(f"name {data['name']!r} must be a Python-style identifier (letters, digits, _)")
        if data["name"] in RESERVED:
            raise ValueError(f"name {data['name']!r} is taken by a built-in reward metric; give another `name`")
        return data


class RemoteRewardConfig(StrictModel):
    """A reward served over HTTP (actors/rewards/remote.py: the request and response format)."""

    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)
    """Retries of a failed call; after the last one the step fails (never a silent 0)."""
    weight: float = 1.0
    headers_env: dict[str, str] = {}
    """HTTP headers whose values come from environment variables, {header: VARIABLE}, e.g.
    {Authorization: SCORER_AUTH}: secrets stay out of config files and logs. The variable must be set
    where the run starts (`rayrlhf submit --env VARIABLE` carries it to a cluster's job)."""
    max_response_bytes: int = Field(1 << 20, ge=1)
    """A larger response is an error (a misbehaving server cannot fill the scorer's memory)."""


class RewardConfig(StrictModel):
    alpha: float = 1.0
    """Weight of r_freq, the word-frequency fluency reward."""
    beta: float = 1.0
    """Weight of r_sim, embedding cosine similarity to the reference answer."""
    bleu: float = 0.0
    rouge_l: float = 0.0
    freq_mode: Literal["mean", "sum"] = "mean"
    """mean: average log10 frequency per word; sum: the seed's literal sum (favours short answers)."""
    empty_reward: float = -1.0
    """Total reward of an answer with no words (empty, blank, punctuation): the degenerate optimum."""
    embedding_model: str = "all-minilm-l6-v2"
    """r_sim's sentence embeddings: all-minilm-l6-v2 (built in) or a sentence-transformers directory. The
    usual layout (a Transformer, mean or CLS pooling, Normalize) runs on transformers alone; others
    load through sentence-transformers."""
    normalize: Literal["none", "total", "components"] = "components"
    """Running mean/std z-score of the total, or of each component before weighting."""
    num_scorers: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    """>0 puts the embedder and the reward model on the GPU Ray assigns (fractions share a GPU)."""
    torch_threads: int = Field(1, ge=1)
    rm_weight: float = 0.0
    """Weight γ of r_rm(x, y), a learned reward model; 0: no reward model is loaded."""
    rm_model: str | None = None
    """Directory written by `rayrlhf train-rm` (its final/ folder); needed when rm_weight != 0."""
    rm_batch_size: int = Field(32, ge=1)
    """Rows per reward-model forward pass inside a reward scorer."""
    functions: list[RewardFunctionConfig] = []
    """User reward functions, each a weighted component (normalised and logged like the built-ins)."""
    remote: RemoteRewardConfig | None = None
    """A reward model served elsewhere: its component is `remote`."""
    overlong_penalty: float = Field(1.0, ge=0)
    """DAPO's soft overlong penalty: taken off the total (after normalisation) of an answer in the last
    overlong_buffer of the token budget, growing linearly to the full amount at the limit (0: off).
    With truncation=penalize, the default's held-out ROUGE-L rises and its answers stop running to the
    cap (3 seeds: benchmarks/README.md)."""
    overlong_buffer: float = Field(0.25, gt=0, le=1)
    """That last part of the budget, as a fraction of max_new_tokens (32 tokens: the last 8)."""
    truncation: Literal["penalize", "mask", "keep"] = "penalize"
    """An answer cut at max_new_tokens without EOS: `penalize` (truncation_penalty off its total),
    `mask` (its tokens leave the policy loss, DAPO's overlong filtering) or `keep` (no control)."""
    truncation_penalty: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _rm_model_and_unique_names(self) -> RewardConfig:
        if self.rm_weight != 0 and not self.rm_model:
            raise ValueError("reward.rm_weight != 0 needs reward.rm_model (a directory from `rayrlhf train-rm`)")
        names = [f.name for f in self.functions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"reward.functions: the name(s) {twice} are used twice; give each function its own `name`")
        return self
