"""DAPO's dynamic sampling (algorithm.dynamic_sampling): a step trains only prompt groups whose rewards differ.

Under a group-relative estimator (grpo, dr_grpo, reinforce) a group whose k rewards are all equal has
zero advantages: it adds no policy gradient and only dilutes the loss's normaliser. DAPO (Yu et al.
2025, "dynamic sampling"; verl's algorithm.filter_groups) drops such groups and samples further prompts
until the batch is full.

Here a step draws batches of prompts_per_step prompts (a "draw": generate, score and take reference
log-probs, `collect`) until it holds prompts_per_step groups with differing rewards or has made
max_draws draws. The batch is the first prompts_per_step such groups in draw order; surplus ones are
dropped, as DAPO and verl do (the batch size stays fixed and nothing is carried to the next step). At
the limit the step trains the groups it kept, the batch filled with constant groups left out of the
loss (loss mask 0, so every learner rank still gets its fixed number of rows); if no group was kept at
all, it trains the last draw as it is (zero policy gradient; the KL and entropy terms still count). A
step never waits and is never empty, and the log says when the limit was hit.

Each draw goes through the prompt sampler, so its state counts the extra draws and a resumed run draws
the same prompts; each draw is one `collect` that the recovery redoes whole (same prompts) if a
stateless role dies; a pipelined run collects its batch ahead the same way and checkpoints it filtered.

Which groups to keep (`varied_groups`, `choose`) and the new shards (`regroup`) are pure numpy;
`refill` runs the draws and, when it drops a group, fetches the draws' arrays to the driver (small:
token ids, masks and log-probs of one step) and puts one shard per learner rank back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
import ray

from rayrlhf.actors.rl.trajectory import Rewards, Trajectory, concat, loss_rows

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import RunConfig

T = TypeVar("T", Trajectory, Rewards)


class Draw(Protocol):
    """What one draw's `collect` returns (jobs/run/pipeline.py's Experience, a dataclass): refs, one entry
    per shard."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    trajectories: list[Any]
    reward_refs: list[Any]
    rewards: list[Rewards]
    ref_logprobs: list[Any]
    times: dict[str, float]


E = TypeVar("E", bound=Draw)


def varied_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """[rows / group_size] bool: the groups whose rewards are not all equal. A group is group_size
    consecutive rows: a rollout worker returns each prompt's k samples together."""
    groups = np.asarray(scores).reshape(-1, group_size)
    return groups.max(axis=1) > groups.min(axis=1)


def choose(varied: np.ndarray, needed: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's `needed` groups (indices into every group drawn, in draw order) and whether each
    enters the loss: the first varied ones; too few: then the latest constant ones, out of the loss;
    none at all: the last `needed` groups (the last draw), in the loss."""
    kept = np.flatnonzero(varied)[:needed]
    if len(kept) == 0:
        return np.arange(len(varied) - needed, len(varied)), np.ones(needed, dtype=bool)
    constant = np.flatnonzero(~varied)
    filler = constant[len(constant) - (needed - len(kept)):]
    return np.concatenate([kept, filler]), np.arange(needed) < len(kept)


def _take(value: Any, rows: np.ndarray, n: int) -> Any:
    if isinstance(value, np.ndarray) and value.ndim and len(value) == n:
        return value[rows]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in rows]
    if isinstance(value, dict):
        return {key: _take(v, rows, n) for key, v in value.items()}
    return value


def take(batch: T, rows: np.ndarray) -> T:
    """`batch` with only `rows`: its per-row arrays (and dicts of them) and lists; other fields as they are."""
    n = len(batch.total) if isinstance(batch, Rewards) else len(batch)
    return replace(batch, **{f.name: _take(getattr(batch, f.name), rows, n) for f in fields(batch)})


def join_rewards(parts: list[Rewards], loss_mask: np.ndarray) -> Rewards:
    """Several batches' rewards as one, with the loss mask given."""

    def joined(name: str) -> dict[str, np.ndarray]:
        return {key: np.concatenate([getattr(p, name)[key] for p in parts]) for key in getattr(parts[0], name)}

    total = np.concatenate([p.total for p in parts])
    return Rewards(total=total, raw_total=np.concatenate([p.raw_total for p in parts]), components=joined("components"),
                   loss_mask=loss_mask, info=joined("info"))  # fmt: skip


def regroup(
    trajectories: list[Trajectory], rewards: list[Rewards], ref_logprobs: list[np.ndarray | None],
    groups: np.ndarray, in_loss: np.ndarray, group_size: int, shards: int,
) -> list[tuple[Trajectory, Rewards, np.ndarray | None]]:
    """The chosen groups of the draws' parts (given in order) as `shards` equal shards; the groups out
    of the loss get loss mask 0."""
    trajectory = concat(trajectories)
    rows = (groups[:, None] * group_size + np.arange(group_size)).ravel()
    loss_mask = loss_rows(rewards, len(trajectory))
    loss_mask[rows[~np.repeat(in_loss, group_size)]] = 0.0
    reward = join_rewards(rewards, loss_mask)
    width, arrays = trajectory.input_ids.shape[1], [r for r in ref_logprobs if r is not None]
    ref = None  # padded to the joined width, as LearnerBatch.join does
    if arrays:
        ref = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in arrays])
    return [(take(trajectory, part), take(reward, part), None if ref is None else ref[part])
            for part in np.split(rows, shards)]  # fmt: skip


def refill(
    collect_draw: Callable[[], E], cfg: RunConfig, ranks: int, log: Callable[[str], None]
) -> E:
    """The step's experience: draws (`collect_draw()`: prompts from the sampler, collected) until
    prompts_per_step groups with differing rewards are in hand or max_draws were made; the batch as
    `choose` says, one shard per learner rank. Its times hold the draws' summed timings and
    dynamic_sampling/{draws, prompts_drawn, kept_frac, groups_kept}."""
    needed, k = cfg.prompts_per_step, cfg.rollout.samples_per_prompt
    max_draws = cfg.algorithm.dynamic_sampling.max_draws
    draws: list[E] = []
    varied = np.zeros(0, dtype=bool)
    while not draws or (varied.sum() < needed and len(draws) < max_draws):
        draws.append(collect_draw())
        varied = np.concatenate([varied, *(varied_groups(r.total, k) for r in draws[-1].rewards)])
    kept = int(min(varied.sum(), needed))
    times = {key: sum(d.times[key] for d in draws) for key in draws[0].times}
    times.update({"dynamic_sampling/draws": float(len(draws)), "dynamic_sampling/prompts_drawn": float(len(varied)),
                  "dynamic_sampling/kept_frac": float(varied.mean()), "dynamic_sampling/groups_kept": float(kept)})
    if len(draws) == 1 and varied.all():
        return replace(draws[0], times=times)
    if kept < needed:
        then = "trains the last draw as it is" if kept == 0 else (
            f"trains those, the batch filled with {needed - kept} constant groups left out of the loss")
        log(f"dynamic sampling: {kept} of {needed} groups with differing rewards after "
            f"algorithm.dynamic_sampling.max_draws={max_draws} draws ({len(varied)} prompts); the step {then}")
    groups, in_loss = choose(varied, needed)
    refs = [r for d in draws for r in d.ref_logprobs]
    parts = regroup(ray.get([t for d in draws for t in d.trajectories]), [r for d in draws for r in d.rewards],
                    [None if r is None else ray.get(r) for r in refs], groups, in_loss, k, ranks)
    return replace(
        draws[0], trajectories=[ray.put(t) for t, _, _ in parts], reward_refs=[ray.put(r) for _, r, _ in parts],
        rewards=[r for _, r, _ in parts], ref_logprobs=[None if x is None else ray.put(x) for _, _, x in parts],
        times=times,
    )
