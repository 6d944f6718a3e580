"""The reward role: r(y, y*) = α·r_freq(y) + β·r_sim(y, y*) + w_bleu·BLEU + w_rouge·ROUGE-L
[+ γ·r_rm(x, y), a learned reward model, when reward.rm_weight != 0]
[+ w_i·f_i(x, y, y*, extras) for each user function in reward.functions, + w·remote(...)]
[- the length penalties of actors/rewards/length_control.py, added after normalisation].

A plain class; the driver makes it a Ray actor with `ray.remote(RewardScorer)`. The constructor's
defaults only switch the later additions off (for hand-made scorers in tests and benchmarks); a run
gets every value from jobs/config/run.py.
Every component is computed for every row, whatever its weight, and returned raw so that the
driver logs them all (reward hacking shows up in the unweighted components); the embedding is
the only costly part and one batched encode call.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import wordfreq

from rayrlhf.actors.runtime.devices import select_device
from rayrlhf.actors.rewards.embeddings import Embedder, resolve_embedding_model
from rayrlhf.actors.rewards.length_control import LengthControl
from rayrlhf.actors.runtime.models import resolve_here
from rayrlhf.actors.rewards.normalizer import RunningNormalizer
from rayrlhf.actors.rewards.remote import RemoteReward
from rayrlhf.actors.rewards.metrics import bleu as bleu_score
from rayrlhf.actors.rewards.metrics import freq_reward, words
from rayrlhf.actors.rewards.metrics import rouge_l as rouge_l_score
from rayrlhf.actors.rewards.user_functions import batch_arguments, call_function, load_function
from rayrlhf.actors.rewards.reward_model import RewardModel, check_reward_model_dir, prompt_as_text
from rayrlhf.actors.rl.trajectory import Rewards, Trajectory

COMPONENTS = ("freq", "sim", "bleu", "rouge_l")
RM = "rm"
"""The learned reward's component: present only when reward.rm_weight != 0 (a model is loaded)."""
REMOTE = "remote"
"""The component of reward.remote, a reward served over HTTP."""


class RewardScorer:
    def __init__(
        self,
        *,
        alpha: float,
        beta: float,
        bleu: float,
        rouge_l: float,
        freq_mode: Literal["mean", "sum"],
        empty_reward: float,
        embedding_model: str,
        normalize: Literal["none", "total", "components"],
        torch_threads: int,
        rm_weight: float,
        rm_model: str | None,
        rm_batch_size: int,
        functions: list[dict[str, Any]] | None = None,
        remote: dict[str, Any] | None = None,
        overlong_penalty: float = 0.0,
        overlong_buffer: float = 0.25,
        truncation: Literal["penalize", "mask", "keep"] = "keep",
        truncation_penalty: float = 0.0,
        device: str = "cpu",
    ) -> None:
        self.weights = {"freq": alpha, "sim": beta, "bleu": bleu, "rouge_l": rouge_l}
        self.freq_mode = freq_mode
        self.empty_reward = empty_reward
        self.normalize = normalize
        self.device = select_device(device)
        # models are resolved on this node (the driver's paths mean nothing here)
        embedder_path = resolve_here("reward.embedding_model", lambda: resolve_embedding_model(embedding_model))
        self.embedder = Embedder(embedder_path, torch_threads=torch_threads, device=str(self.device))
        self.reward_model: RewardModel | None = None  # loaded only when it weighs: it costs a forward pass
        if rm_weight != 0:
            if not rm_model:
                raise ValueError("reward.rm_weight != 0 needs reward.rm_model (a directory from `rayrlhf train-rm`)")
            rm_path = resolve_here("reward.rm_model", lambda: check_reward_model_dir(rm_model))
            self.reward_model = RewardModel.load(rm_path).to(self.device)
            self.weights[RM] = rm_weight
        self.rm_batch_size = rm_batch_size
        self.functions = {}
        for spec in functions or []:
            name = spec["name"]
            if name in (*COMPONENTS, RM, REMOTE, "total") or name in self.functions:
                raise ValueError(f"reward.functions: the name {name!r} is taken; give the function another name")
            self.functions[name] = load_function(spec["path"])
            self.weights[name] = spec["weight"]
        self.remote = None
        if remote is not None:
            self.remote = RemoteReward(remote["url"], remote["timeout_s"], remote["retries"])
            self.weights[REMOTE] = remote["weight"]
        self.length = LengthControl(overlong_penalty, overlong_buffer, truncation, truncation_penalty)
        self.names = (
            *COMPONENTS, *([RM] if self.reward_model is not None else []), *self.functions,
            *([REMOTE] if self.remote is not None else []),
        )
        self.normalizers = {name: RunningNormalizer() for name in (*self.names, "total")}
        wordfreq.word_frequency("the", "en")  # loads the word list now, not in the first step

    def components(
        self,
        responses: list[str],
        references: list[str | None],
        prompts: list[Any] | None = None,
        extras: list[dict[str, Any]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Raw per-row values; rows without a reference get NaN for the reference-based ones,
        "rm" (the reward model's score of prompt and response) is there when a model is loaded,
        and each user function and the remote reward have their own (NaN where not applicable)."""
        n = len(responses)
        out = {name: np.full(n, np.nan, dtype=np.float32) for name in self.names}
        out["freq"][:] = [freq_reward(r, self.freq_mode) for r in responses]
        rows = [i for i, ref in enumerate(references) if ref is not None]
        if rows:
            hyps = [responses[i] for i in rows]
            refs = [references[i] for i in rows]
            out["sim"][rows] = self.embedder.similarity(hyps, refs)
            out["bleu"][rows] = [bleu_score(h, r) for h, r in zip(hyps, refs)]
            out["rouge_l"][rows] = [rouge_l_score(h, r) for h, r in zip(hyps, refs)]
        if self.reward_model is not None:
            if prompts is None or len(prompts) != n:
                raise ValueError("the reward model needs one prompt per response")
            texts = [prompt_as_text(p) for p in prompts]
            out[RM][:] = self.reward_model.score(texts, list(responses), self.rm_batch_size)
        if self.functions or self.remote is not None:
            kwargs = batch_arguments(list(prompts or [None] * n), list(responses), list(references), extras)
            for name, fn in self.functions.items():
                out[name][:] = call_function(fn, name, kwargs)
            if self.remote is not None:
                rows = list(extras or [{} for _ in range(n)])
                out[REMOTE][:] = self.remote.score(kwargs["prompts"], kwargs["completions"], kwargs["references"], rows)
        return out

    def score(self, traj: Trajectory, update_stats: bool = True) -> Rewards:
        """Rewards for one batch; `update_stats=False` (evaluation) leaves the normalisers as they are.

        Responses without a single word (empty, whitespace, punctuation only) get `empty_reward` as
        their total and are left out of the normaliser statistics: they are the degenerate optimum
        of r_freq (an empty answer scores 0, the maximum), not a sample of real answers.
        """
        responses, references = list(traj.responses), list(traj.references)
        if len(references) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        comps = self.components(responses, references, list(traj.prompt_texts or traj.prompts), traj.extras)
        empty = np.array([not words(r) for r in responses], dtype=bool)
        raw = np.zeros(len(responses), dtype=np.float64)
        total = np.zeros(len(responses), dtype=np.float64)
        for name, weight in self.weights.items():
            if weight == 0:
                continue
            values = comps[name].astype(np.float64)
            raw += weight * np.nan_to_num(values, nan=0.0)
            if self.normalize == "components":
                values = self._normalize(name, values, empty, update_stats)
            total += weight * np.nan_to_num(values, nan=0.0)
        if self.normalize == "total":
            total = self._normalize("total", total, empty, update_stats)
        elif self.normalize == "none":
            total = raw.copy()
        penalty = self.length.penalty(traj)
        total -= penalty
        raw -= penalty
        total[empty] = self.empty_reward
        raw[empty] = self.empty_reward
        return Rewards(
            total=total.astype(np.float32), raw_total=raw.astype(np.float32), components=comps,
            loss_mask=self.length.loss_mask(traj), info=self.length.info(traj, penalty),
        )

    def _normalize(self, name: str, values: np.ndarray, empty: np.ndarray, update: bool) -> np.ndarray:
        norm = self.normalizers[name]
        if update:
            norm.update(values[~empty])
        return norm.normalize(values, update=False)

    def state_dict(self) -> dict[str, Any]:
        return {name: norm.state_dict() for name, norm in self.normalizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, norm in self.normalizers.items():
            norm.load_state_dict(state[name])
