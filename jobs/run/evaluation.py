"""Held-out evaluation across the roles, as the field reports it: greedy (or beam) answers, and with
eval.samples_per_prompt = n also n sampled answers per prompt (jobs/run/eval_metrics.py: mean@n and
pass@k). Scoring never touches the normaliser statistics; `train`, `tune` and `rayrlhf eval` call this.
"""

from __future__ import annotations

import numpy as np
import ray
from tqdm import tqdm

from rayrlhf.actors.rl.trajectory import Prompt, Rewards
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.run.eval_metrics import sampled_metrics
from rayrlhf.jobs.run.pipeline import reward_metrics, shards
from rayrlhf.jobs.run.recovery import Recovery
from rayrlhf.jobs.run.roles import Roles


def evaluate(
    cfg: RunConfig, roles: Roles, prompts: list[Prompt], recovery: Recovery | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Held-out metrics and the greedy answers as examples; a dead replica redoes the whole evaluation."""
    recovery = recovery or Recovery(roles, cfg.fault_tolerance)
    return recovery.run("the evaluation", lambda: _evaluate(cfg, roles, prompts, recovery))


def _generate(cfg: RunConfig, roles: Roles, prompts: list[Prompt], samples: int, recovery: Recovery) -> list:
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    if roles.episodes is not None:  # multi-turn: greedy (or seeded) episodes, beam search has no meaning there
        parts = shards(prompts, len(roles.rollout))
        return roles.episodes.play(roles.rollout, roles.envs, parts, recovery.version, recovery.environment,
                                   samples=samples, greedy=samples == 0, seed=cfg.seed, max_new_tokens=max_new)
    if samples == 0:
        options = dict(greedy=True, num_beams=cfg.eval.num_beams)
    else:  # drawn from the run's seed alone: the same weights give the same answers in train and in eval
        options = dict(greedy=False, samples=samples, seed=cfg.seed)
    return [
        roles.rollout[i].generate.remote(ray.put(shard), max_new_tokens=max_new, **options)
        for i, shard in enumerate(shards(prompts, len(roles.rollout)))
    ]


def _shown(cfg: RunConfig, refs: list, sizes: list[int], desc: str = "held-out eval") -> list:
    """The refs, once each shard's answers are in: a progress bar (cleared when done) counts prompts."""
    size_of = dict(zip(refs, sizes))
    with tqdm(total=sum(sizes), desc=desc, unit="prompt", leave=False,
              disable=not cfg.logging.progress_bar) as bar:  # fmt: skip
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            bar.update(size_of[done[0]])
    return refs


def _evaluate(cfg: RunConfig, roles: Roles, prompts: list[Prompt], recovery: Recovery) -> tuple[dict[str, float], list[dict]]:
    sizes = [len(shard) for shard in shards(prompts, len(roles.rollout))]  # as _generate cuts them
    traj_refs = _shown(cfg, _generate(cfg, roles, prompts, 0, recovery), sizes)
    _, rewards = recovery.score(traj_refs, update_stats=False)
    trajectories = ray.get(traj_refs)
    metrics = reward_metrics(rewards, "eval")
    metrics.pop("eval/total")  # normalised total is not comparable across time; eval/raw is
    lengths = np.concatenate([t.response_lengths for t in trajectories])
    responses = [r for t in trajectories for r in t.responses]
    metrics["eval/length"] = float(lengths.mean())
    metrics["eval/empty_frac"] = float(np.mean([not r.strip() for r in responses]))
    if cfg.eval.samples_per_prompt:
        n = cfg.eval.samples_per_prompt
        # answers first, then scoring: score_timeout_s bounds the scorer, not the generation before it
        sampled_refs = _shown(cfg, _generate(cfg, roles, prompts, n, recovery), sizes, f"held-out eval, {n} samples")
        _, sampled = recovery.score(sampled_refs, update_stats=False)
        metrics.update(sampled_metrics(_joined(sampled), n))
    examples = [
        {"prompt": p, "response": r, "reference": ref}
        for t in trajectories for p, r, ref in zip(t.prompts, t.responses, t.references)
    ]
    return metrics, examples


def _joined(rewards: list[Rewards]) -> dict[str, np.ndarray]:
    """Each component's scores over all shards, in prompt order (shards are contiguous runs of prompts)."""
    joined = {name: np.concatenate([r.components[name] for r in rewards]) for name in rewards[0].components}
    joined["raw"] = np.concatenate([r.raw_total for r in rewards])
    return joined
