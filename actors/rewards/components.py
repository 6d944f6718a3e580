"""Every reward is a component: a name, a weight and score(batch), one float per row.

NaN in a row means "does not apply" (no reference answer, a user function's None): the row counts
0 in the total and stays out of the normaliser statistics. The built-in metrics, the learned
reward model and user functions are components here; the remote reward (remote.py) implements the
protocol itself. The scorer (actors/reward_scorer.py) builds its components once and scores every
batch with each of them (actors/rewards/scoring.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Protocol

import numpy as np
import torch
import wordfreq

from rayrlhf.actors.rewards.embeddings import Embedder, resolve_embedding_model
from rayrlhf.actors.rewards.metrics import freq_reward
from rayrlhf.actors.rewards.names import FREQ, RESERVED, RM, SIM
from rayrlhf.actors.rewards.reward_model import RewardModel, check_reward_model_dir, prompt_as_text
from rayrlhf.actors.rewards.user_functions import batch_arguments, call_function, load_function
from rayrlhf.actors.rl.trajectory import Trajectory
from rayrlhf.actors.runtime.models import resolve_here


@dataclass(frozen=True)
class RewardBatch:
    """What a component reads of one trajectory batch: lists aligned by row."""

    prompts: list[Any]
    """As asked (text or chat messages, before any chat template)."""
    responses: list[str]
    references: list[str | None]
    extras: list[dict[str, Any]]
    """Each row's other data fields."""

    @classmethod
    def of(cls, traj: Trajectory) -> RewardBatch:
        responses, references = list(traj.responses), list(traj.references)
        if len(references) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        extras = list(traj.extras) or [{} for _ in responses]
        return cls(list(traj.prompt_texts or traj.prompts), responses, references, extras)

    @cached_property
    def arguments(self) -> dict[str, list[Any]]:
        """The keyword lists user functions get (user_functions.py), built once per batch."""
        return batch_arguments(self.prompts, self.responses, self.references, self.extras)


class RewardComponent(Protocol):
    name: str
    """Its key in Rewards.components, the normaliser state and the logs (reward/<name>)."""
    weight: float
    """Its weight in the total; at 0 it is still computed and logged, only left out of the total."""

    def score(self, batch: RewardBatch) -> np.ndarray:
        """[B] float32 raw values, NaN where it does not apply."""
        ...


def on_referenced(batch: RewardBatch, score_pairs: Callable[[list[str], list[str]], Any]) -> np.ndarray:
    """score_pairs(responses, references) over the rows with a reference, in one call; NaN elsewhere."""
    out = np.full(len(batch.responses), np.nan, dtype=np.float32)
    pairs = [(i, ref) for i, ref in enumerate(batch.references) if ref is not None]
    if pairs:
        rows = [i for i, _ in pairs]
        out[rows] = score_pairs([batch.responses[i] for i in rows], [ref for _, ref in pairs])
    return out


@dataclass
class Frequency:
    """r_freq: log10 word frequency of the response (actors/rewards/metrics.py)."""

    weight: float
    mode: Literal["mean", "sum"]
    name = FREQ

    def __post_init__(self) -> None:
        wordfreq.word_frequency("the", "en")  # loads the word list now, not in the first step

    def score(self, batch: RewardBatch) -> np.ndarray:
        return np.array([freq_reward(r, self.mode) for r in batch.responses], dtype=np.float32)


@dataclass
class Similarity:
    """r_sim: cosine similarity of response and reference embeddings; the costly component, so one
    batched encode call per batch."""

    weight: float
    embedder: Embedder
    name = SIM

    @classmethod
    def load(cls, weight: float, model: str, torch_threads: int, device: str) -> Similarity:
        # resolved on this node: the driver's paths mean nothing here
        path = resolve_here("reward.embedding_model", lambda: resolve_embedding_model(model))
        return cls(weight, Embedder(path, torch_threads=torch_threads, device=device))

    def score(self, batch: RewardBatch) -> np.ndarray:
        return on_referenced(batch, self.embedder.similarity)


@dataclass
class PairMetric:
    """A metric of one response against its reference answer (BLEU, ROUGE-L)."""

    name: str
    weight: float
    metric: Callable[[str, str], float]

    def score(self, batch: RewardBatch) -> np.ndarray:
        return on_referenced(batch, lambda hyps, refs: [self.metric(h, r) for h, r in zip(hyps, refs)])


@dataclass
class LearnedReward:
    """r_rm(x, y), a reward model from `rayrlhf train-rm`: it reads the prompt as asked."""

    weight: float
    model: RewardModel
    batch_size: int
    """Rows per forward pass."""
    name = RM

    @classmethod
    def load(cls, weight: float, path: str | None, batch_size: int, device: torch.device) -> LearnedReward:
        if not path:
            raise ValueError("reward.rm_weight != 0 needs reward.rm_model (a directory from `rayrlhf train-rm`)")
        found = resolve_here("reward.rm_model", lambda: check_reward_model_dir(path))  # on this node
        return cls(weight, RewardModel.load(found).to(device), batch_size)

    def score(self, batch: RewardBatch) -> np.ndarray:
        if len(batch.prompts) != len(batch.responses):
            raise ValueError("the reward model needs one prompt per response")
        return self.model.score([prompt_as_text(p) for p in batch.prompts], batch.responses, self.batch_size)


@dataclass
class UserFunction:
    """A function of reward.functions (user_functions.py says how it is loaded and called)."""

    name: str
    weight: float
    fn: Callable[..., Any]

    @classmethod
    def load(cls, name: str, path: str, weight: float) -> UserFunction:
        if name in RESERVED:
            raise ValueError(f"reward.functions: the name {name!r} is taken; give the function another name")
        return cls(name, weight, load_function(path))

    def score(self, batch: RewardBatch) -> np.ndarray:
        return call_function(self.fn, self.name, batch.arguments)
