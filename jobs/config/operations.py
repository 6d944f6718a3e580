"""The sections of a run config that say how a run is carried out rather than what it learns: the
cluster, logging and health checks (monitor), held-out evaluation, checkpoints, the rollout/learning
overlap (pipeline) and recovery from failures (fault_tolerance). Part of the run-config schema
(jobs/config/run.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayrlhf.jobs.config.base import StrictModel


class ClusterConfig(StrictModel):
    address: str | None = None
    """None: start Ray in-process on loopback (or attach to $RAY_ADDRESS)."""
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int = Field(1024, ge=64)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class LoggingConfig(StrictModel):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rayrlhf"
    tensorboard: bool = True
    progress_bar: bool = True


class EvalConfig(StrictModel):
    num_beams: int = Field(1, ge=1)
    """Held-out answers by beam search with this many beams (1: greedy)."""
    samples_per_prompt: int = Field(0, ge=0)
    """n > 0: also n sampled answers per held-out prompt (at rollout.temperature / top_p), reported as
    eval/<component>/mean@n, and eval/<component>/pass@k (k = 1, 2, 4, ... <= n) for 0/1 components."""
    best_metric: str | None = None
    """A held-out metric (eval/math_exact_match, eval/rouge_l, ...): the policy of the evaluation that
    scored best on it is kept in <output_dir>/best, beside final/ (the last). Evaluations run before and
    after training and every eval_every steps."""
    best_mode: Literal["max", "min"] = "max"


class MonitorConfig(StrictModel):
    """Training-health checks (jobs/run/health.py), each step; a threshold of None turns its check off.
    A warning is printed when a check starts failing (once per crossing), and its flag health/<check>
    (0/1) is logged with the step's metrics."""

    window: int = Field(3, ge=1)
    """The per-step checks read the mean of the last `window` steps (one batch is noisy); the run's
    first `window` steps are the length check's baseline."""
    max_length_growth: float | None = Field(1.5, gt=0)
    """length: sampled answers' length against their references (words, reward/length_ratio) grew to
    more than this many times the same ratio over the run's first `window` steps."""
    max_truncated_frac: float | None = Field(0.6, ge=0, le=1)
    """truncation: more than this fraction of sampled answers cut at rollout.max_new_tokens."""
    min_entropy: float | None = Field(0.1, ge=0)
    """entropy: the policy's mean token entropy (nats) fell below this (collapse)."""
    max_kl: float | None = Field(1.0, gt=0)
    """kl: KL to the reference policy per token above this."""
    held_out: str = "eval/rouge_l"
    """hacking: between two evaluations this held-out metric fell by more than hacking_tolerance
    while a weighted reward component rose over the training steps in between."""
    hacking_tolerance: float = Field(0.01, ge=0)
    stop_on: list[Literal["length", "truncation", "entropy", "kl", "hacking"]] = []
    """Checks that end training (after the step's logging; the final evaluation and save still run)."""
    plot: bool = True
    """Write training.png (reward components, length, KL and entropy, held-out metrics) at the end."""


class CheckpointConfig(StrictModel):
    """The run checkpoint (jobs/run/checkpoint.py): everything exact resume needs, under output_dir/checkpoints."""

    every: int = Field(0, ge=0)
    """Write one every N steps (0: off). `save_every` sets this too."""
    every_minutes: float | None = Field(30.0, gt=0)
    """Also write one when this much time has passed since the last (None: off), so a driver or machine
    death loses at most that much work. A stop (SIGINT/SIGTERM) or an error always writes one."""
    keep: int = Field(2, ge=1)
    """The last N checkpoints are kept; older ones are deleted once a newer one is complete."""
    stop_grace_s: float | None = Field(None, gt=0)
    """Seconds between a SIGTERM and the SIGKILL after it (a scheduler's grace period). With it, a step
    whose rest and a checkpoint would not fit in that time is abandoned before its learner starts,
    and the state before it saved (jobs/run/stop.py). None: the job's RAY_JOB_STOP_WAIT_TIME_S, which
    `rayrlhf submit` sets (`--stop-wait`), else unknown: the step always finishes first."""


class PipelineConfig(StrictModel):
    """Overlap of rollout and learning (jobs/run/pipeline.py) and the loss's off-policy correction
    (actors/rl/offpolicy.py)."""

    max_staleness: int = Field(0, ge=0)
    """0: the synchronous loop (generate, score, learn, sync, in turn). k >= 1: the next step's batch is
    generated, scored and given reference log-probs while the learner trains the current one; the
    learner accepts a batch sampled at most k policy versions ago (the driver never starts one that
    would be older when trained). The driver runs one batch ahead and syncs after every update, so
    staleness is at most 1 whatever k >= 1 says."""
    is_cap: float = Field(2.0, gt=0)
    """With max_staleness >= 1: the cap of the truncated importance weights pi_learner/pi_rollout
    (per token) that correct the loss for samples drawn by an older policy."""


class FaultToleranceConfig(StrictModel):
    """How a run survives failures inside the job (docs/checkpoints.md)."""

    max_actor_restarts: int = Field(3, ge=0)
    """Process deaths each rollout worker, reward scorer and the reference policy survives (Ray
    max_restarts); the interrupted step is redone. 0: the first death ends the run."""
    restart_timeout_s: float = Field(300.0, gt=0)
    """How long the driver waits for a restarted actor to answer again (its model reloads first)."""
    score_timeout_s: float = Field(120.0, gt=0)
    """Wall-clock limit on scoring one batch (a step's, or an evaluation's); a scorer past it is
    restarted and the batch scored again."""
    score_retries: int = Field(2, ge=0)
    """Further attempts after a failed or timed-out scoring; then the step fails (never a reward of 0)."""
    max_learner_restarts: int = Field(1, ge=0)
    """A dead learner rank restarts the learner group from the latest checkpoint (or the start), at most N times."""
    node_wait_s: float = Field(600.0, gt=0)
    """How long replicas whose node died wait for a node with room for them (a replacement joining, as an
    autoscaler or a spot pool brings one); then the run ends naming the node and what lived there."""
