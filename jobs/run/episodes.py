"""Multi-turn rollouts: the driver alternates generation (rollout workers) and environment steps
(the environment pool), turn by turn, over a batch of episodes.

Why the driver runs the loop, not the rollout worker: the environment actors then get the reward
scorers' treatment from the same code (jobs/run/recovery.py: a timeout kills and restarts the actor,
a death makes `Recovery.run` redo the whole rollout from the rollout workers' saved counters), the
rollout worker stays a plain class that never waits on other actors, and a slow environment worker
delays only the turn it is in. What crosses per turn is small: token id lists and messages.

Each turn, the episodes still going are batched per shard (one `RolloutWorker.turn` call each) and
then stepped on their environment worker (an episode's (prompt id, sample) picks it);
an episode leaves the batch when its environment says done, when it runs out of env.max_turns or
env.max_tokens, or when a reply is cut at its token budget without EOS. The trajectory of a shard is
assembled here (actors/environments/episode.py: token in, token out) and put in the object store.

Seeds: an episode's environment seed is mix_seed(run seed, policy version, prompt id) in training and
mix_seed(run seed, prompt id) in evaluation (the same held-out episodes every time). The k samples of
a prompt share it, so a group plays the same game and its rewards compare like with like. The rollout
workers' sampling follows their own (seed, version, call) scheme. A redone or
resumed rollout therefore replays exactly when the environment is a function of its seed and the
replies; an environment that reads the clock or the network replays only as far as it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from rayrlhf.actors.environments.episode import Episode, to_trajectory
from rayrlhf.actors.generation.sampler import mix_seed
from rayrlhf.actors.rl.trajectory import Prompt, Trajectory
from rayrlhf.cluster.actor_group import ActorGroup

if TYPE_CHECKING:
    from rayrlhf.jobs.config.run import RunConfig

Answers = Callable[[dict[int, ray.ObjectRef], float], dict[int, Any]]
"""Recovery.environment: the environment workers' answers by rank, within a timeout."""


class Episodes:
    """The multi-turn rollout of a run with an environment (`roles.episodes`)."""

    def __init__(self, cfg: RunConfig) -> None:
        assert cfg.env is not None
        self.env, self.seed = cfg.env, cfg.seed
        self.samples, self.max_new_tokens = cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens
        self.pad_id: int | None = None

    def play(
        self, rollout: ActorGroup, envs: ActorGroup, shards: list[list[Prompt]], version: int, answers: Answers, *,
        samples: int | None = None, greedy: bool = False, seed: int | None = None, max_new_tokens: int | None = None,
    ) -> list[ray.ObjectRef[Trajectory]]:
        """One trajectory batch per shard of prompts (k episodes per prompt, rows prompt by prompt).
        Training: no `seed` (the rollout workers' own streams). Evaluation: `seed` alone draws the
        samples (or greedy), leaving the workers' counters untouched, and the episodes' seeds omit the version."""
        k = 1 if greedy else samples or self.samples
        identity = (self.seed,) if seed is not None or greedy else (self.seed, version)
        episodes = [[Episode(p, j, mix_seed(*identity, p.id)) for p in shard for j in range(k)] for shard in shards]
        flat = [(s, e) for s, shard in enumerate(episodes) for e in shard]
        messages = self._env_call(envs, answers, "reset", [e for _, e in flat],
                                  lambda e: (e.row(), e.seed))  # fmt: skip
        contexts: dict[int, list[int] | None] = {id(e): None for _, e in flat}
        for turn in range(self.env.max_turns):
            going = [(s, e) for s, e in flat if not e.over]
            if not going:
                break
            calls = {}
            for s in sorted({s for s, _ in going}):
                mine = [e for t, e in going if t == s]
                turn_seed = None if seed is None and not greedy else mix_seed(seed or 0, turn, s)
                calls[s] = (mine, rollout[s % len(rollout)].turn.remote(
                    [contexts[id(e)] for e in mine], [messages[id(e)] for e in mine],
                    [self.env.max_tokens - len(e.ids) for e in mine], max_new_tokens or self.max_new_tokens,
                    greedy=greedy, seed=turn_seed))  # fmt: skip
            for mine, ref in calls.values():
                for e, t in zip(mine, ray.get(ref)):
                    e.add_turn(t)
                    contexts[id(e)] = e.prompt_ids + e.ids
            stepping = [e for _, e in going if not e.over]
            results = self._env_call(envs, answers, "step", stepping, lambda e: (e.replies[-1],))
            for e in stepping:
                new, reward, done, tool_calls, invalid = results[id(e)]
                e.rewards.append(reward)
                e.tool_calls, e.invalid_calls = e.tool_calls + tool_calls, e.invalid_calls + invalid
                e.done = e.over = done
                messages[id(e)] = new
        if self.pad_id is None:
            self.pad_id = ray.get(rollout[0].__ray_call__.remote(lambda worker: worker.pad_id))
        return [ray.put(to_trajectory(shard, k, version, self.pad_id, self.env.max_tokens)) for shard in episodes]

    def _env_call(
        self, workers: ActorGroup, answers: Answers, method: str, episodes: list[Episode],
        args: Callable[[Episode], tuple],
    ) -> dict[int, Any]:
        """`method` on each episode's environment worker, batched per worker; answers by id(episode)."""
        mine: dict[int, list[Episode]] = {}
        for e in episodes:
            mine.setdefault(self._worker(e, len(workers)), []).append(e)
        refs = {}
        for rank, batch in mine.items():
            keys = [(e.prompt.id, e.sample) for e in batch]
            columns = list(zip(*[args(e) for e in batch]))
            refs[rank] = getattr(workers[rank], method).remote(keys, *[list(c) for c in columns])
        got = answers(refs, self.env.timeout_s) if refs else {}
        return {id(e): answer for rank, batch in mine.items() for e, answer in zip(batch, got[rank])}

    @staticmethod
    def _worker(e: Episode, n: int) -> int:
        return (e.prompt.id * 7919 + e.sample) % n
