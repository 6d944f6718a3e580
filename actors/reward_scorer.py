"""The reward role: r(y, y*) = α·r_freq(y) + β·r_sim(y, y*) + w_bleu·BLEU + w_rouge·ROUGE-L
[+ γ·r_rm(x, y), a learned reward model, when reward.rm_weight != 0]
[+ w_i·f_i(x, y, y*, extras) for each user function in reward.functions, + w·remote(...)]
[- the length penalties of actors/rewards/length_control.py, added after normalisation].

A plain class; the driver makes it a Ray actor with `ray.remote(RewardScorer)`. It builds its
components (actors/rewards/components.py) once from its settings; scoring them, the normalisation
and the length control are actors/rewards/scoring.py. The constructor's defaults only switch the
later additions off (for hand-made scorers in tests and benchmarks); a run gets every value from
jobs/config/reward.py.
"""

from __future__ import annotations

from typing import Any, Literal

from rayrlhf.actors.rewards import metrics
from rayrlhf.actors.rewards.components import Frequency, LearnedReward, PairMetric, Similarity, UserFunction
from rayrlhf.actors.rewards.length_control import LengthControl
from rayrlhf.actors.rewards.names import BLEU, ROUGE_L
from rayrlhf.actors.rewards.remote import RemoteReward
from rayrlhf.actors.rewards.scoring import ComponentScorer
from rayrlhf.actors.runtime.devices import select_device


class RewardScorer(ComponentScorer):
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
        where = select_device(device)
        components = [
            Frequency(alpha, freq_mode),
            Similarity.load(beta, embedding_model, torch_threads, str(where)),
            PairMetric(BLEU, bleu, metrics.bleu),
            PairMetric(ROUGE_L, rouge_l, metrics.rouge_l),
            # the learned reward costs a forward pass: loaded only when it weighs
            *([LearnedReward.load(rm_weight, rm_model, rm_batch_size, where)] if rm_weight != 0 else []),
            *(UserFunction.load(**spec) for spec in functions or []),
            *([RemoteReward(**remote)] if remote is not None else []),
        ]
        length = LengthControl(overlong_penalty, overlong_buffer, truncation, truncation_penalty)
        super().__init__(components, normalize, empty_reward, length)
