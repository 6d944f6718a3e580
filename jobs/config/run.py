"""The run-config schema: the one home of every default.

YAML files in ray_configs/ are validated against `RunConfig`; a bad field fails here, with its
dotted name, before any Ray resource is claimed. Actors never import this module: the driver
hands them plain keyword arguments (`cfg.reward.model_dump()`), so the dependency stays
jobs -> actors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from rayrlhf.actors.rewards.names import RESERVED
from rayrlhf.actors.rl.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from rayrlhf.actors.environments.episode import EPISODE_FIELDS
from rayrlhf.jobs.config.env import EnvConfig
from rayrlhf.jobs.config.base import (
    StrictModel,
    load_yaml,
    merge,
    parse_overrides,
    resolve_config_path,
    validate,
)


class LoraConfig(StrictModel):
    """Low-rank adapters (peft): the learner trains only these; rollout and saved models get them
    merged into the weights, so everything downstream still loads a plain HF directory."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    """Scale of the adapters' output is alpha / rank."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Names (or name suffixes) of the layers that get adapters, or "all-linear" (peft: every linear
    layer but the output head), which fits any architecture."""


class PolicyConfig(StrictModel):
    model: str = "smollm2-135m-instruct"
    """A built-in name (smollm2-135m-instruct, tiny-gpt2), a local HF directory or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Of the rollout and reference models (and of the weights sent to them): auto is bfloat16 on a GPU,
    float32 on a CPU. The learner keeps fp32 master weights; learner.bf16 makes it compute in bf16."""
    max_prompt_tokens: int = Field(256, ge=8)
    cache_dir: str | None = None
    """Where each node keeps converted built-in models; default $RAYRLHF_CACHE, else ~/.cache/rayrlhf (on that node)."""
    lora: LoraConfig | None = None
    """None: full fine-tuning. Set any field (e.g. policy.lora.rank=16) to train LoRA adapters."""


BUILTIN_NUM_TRAIN = 512
"""Training items drawn from a built-in task when data.num_train is not set."""


class DataConfig(StrictModel):
    train: str = "builtin"
    """"builtin" (short factual questions), "builtin_math" (arithmetic word problems in GSM8K's
    format), "builtin_guess_number" (games for env.path=guess_number), or a JSONL/Parquet file with
    `prompt` and optional `reference` fields (or GSM8K's `question` and `answer`)."""
    eval: str | None = None
    """Held-out file; with a built-in train task its own held-out split is used."""
    num_train: int | None = Field(None, ge=1)
    """At most this many training prompts; unset: every row of a file, BUILTIN_NUM_TRAIN of a built-in task."""
    num_eval: int = Field(100, ge=1)
    use_chat_template: bool = True
    system_prompt: str | None = None
    overlong_prompts: Literal["error", "truncate"] = "error"
    """A prompt longer than policy.max_prompt_tokens once rendered (chat template, system prompt):
    "error" stops before Ray starts, naming it; "truncate" cuts it from the left and says how many were."""
    episodes: str | None = None
    """A JSONL file of episodes recorded through the Serve gateway (jobs/data/episodes.py): the steps train
    them instead of generating, prompts_per_step x rollout.samples_per_prompt per step in file order (each
    samples_per_prompt consecutive episodes a group), with the importance correction of pipeline.is_cap.
    data.train still gives the held-out evaluation."""


class RolloutConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    """The base SmolLM2 answers the built-in task in ~14 tokens; 32 truncates few answers."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    """>0 puts the rollout model on the GPU Ray assigns; a fraction lets roles share one GPU."""
    torch_threads: int = Field(2, ge=1)
    max_batch_rows: int = Field(256, ge=1)
    """Rows (prompts x samples) one rollout worker decodes at once; a larger call, such as an
    evaluation with eval.samples_per_prompt, runs its prompts through the batch as rows free up, so
    its KV cache stays bounded (800 rows of SmolLM2 held ~10 GB)."""


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


class KLConfig(StrictModel):
    coef: float = Field(0.05, ge=0)
    estimator: Literal["k1", "k3"] = "k3"
    adaptive: bool = False
    target: float = Field(0.1, gt=0)
    """Target KL per token for the adaptive controller."""
    horizon: int = Field(1000, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    """Launch options of the reference-policy actor, which exists only when the KL term is on."""
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)
    """It overlaps the reward scorers, but they finish in a second or two; then it runs alone."""


if TYPE_CHECKING:  # a Literal built from a table is pydantic's to check; the type checker sees a str
    EstimatorName = str
    PolicyLossName = str
    AggregationName = str
else:
    EstimatorName = Literal[tuple(ADVANTAGE_ESTIMATORS)]
    PolicyLossName = Literal[tuple(POLICY_LOSSES)]
    AggregationName = Literal[tuple(LOSS_AGGREGATIONS)]
"""The names the algorithm tables hold (actors/rl/algorithms.py: torch-free, so validation stays light)."""


class DynamicSamplingConfig(StrictModel):
    """DAPO's dynamic sampling (Yu et al. 2025; verl: algorithm.filter_groups): drop the prompt groups
    whose rewards are all equal (zero advantages: they teach nothing) and refill the step's batch from
    further prompts (jobs/run/dynamic_sampling.py, docs/verifiable_rewards.md)."""

    enabled: bool = False
    max_draws: int = Field(3, ge=1)
    """Batches of prompts_per_step prompts generated at most per step (verl: max_num_gen_batches). At the
    limit the step trains the groups kept, the batch filled with constant groups left out of the loss;
    none kept: the last draw, as it is."""


class AlgorithmConfig(StrictModel):
    name: EstimatorName = "grpo"
    """The advantage estimator: grpo, dr_grpo (group mean baseline, no std; it defaults loss_aggregation to
    seq-mean-token-sum-norm), reinforce (RLOO, leave-one-out baseline), reinforce_pp (REINFORCE++: KL in
    the per-token reward, batch-whitened returns) or ppo (GAE with a value head)."""
    policy_loss: PolicyLossName = "ppo_clip"
    """ppo_clip: the clipped surrogate (a pipelined run takes its ratio to the proximal policy); cispo:
    the clipped, stop-gradient importance weight times A log pi (MiniMax-M1); gspo: the sequence-level
    ratio and clip (it defaults loss_aggregation to seq-mean-token-mean)."""
    loss_aggregation: AggregationName = "token-mean"
    """How the step's per-token losses become one (the same whatever learner.micro_batch_size):
    token-mean over all its response tokens, seq-mean-token-mean (each answer's token mean, averaged),
    seq-mean-token-sum (each answer's token sum, averaged), seq-mean-token-sum-norm (the sum over
    loss_scale_tokens, averaged: Dr. GRPO)."""
    loss_scale_tokens: int | None = Field(None, ge=1)
    """seq-mean-token-sum-norm's constant; None: rollout.max_new_tokens."""
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_low: float | None = Field(None, gt=0)
    """The ratio's lower clip, 1 - clip_eps_low; None: clip_eps."""
    clip_eps_high: float | None = Field(None, gt=0)
    """The ratio's upper clip, 1 + clip_eps_high; None: clip_eps. DAPO's clip-higher: 0.2 / 0.28."""
    epochs: int = Field(1, ge=1)
    """Passes over each rollout batch."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    normalize_std: bool = True
    """GRPO: divide group-centred rewards by the group std."""
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()

    @model_validator(mode="before")
    @classmethod
    def _paper_aggregations(cls, data: Any) -> Any:
        """The aggregation each paper defines its method with, unless loss_aggregation is given.
        Dr. GRPO (Liu et al. 2025) is two changes: no std in the advantage (the dr_grpo estimator) and
        no 1/|o_i| in the loss, so one name chooses both; GSPO averages each answer's token mean."""
        if isinstance(data, dict) and "loss_aggregation" not in data:
            if data.get("name") == "dr_grpo":
                data = {**data, "loss_aggregation": "seq-mean-token-sum-norm"}
            elif data.get("policy_loss") == "gspo":
                data = {**data, "loss_aggregation": "seq-mean-token-mean"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmConfig:
        if self.eps_high < self.eps_low:
            raise ValueError(f"algorithm.clip_eps_high ({self.eps_high}) must be >= clip_eps_low ({self.eps_low})")
        if self.eps_low >= 1:
            raise ValueError(f"algorithm.clip_eps_low ({self.eps_low}) must be < 1: the ratio's lower clip is 1 - it")
        if self.dynamic_sampling.enabled and not ADVANTAGE_ESTIMATORS[self.name].group_relative:
            relative = [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.group_relative]
            raise ValueError(f"algorithm.dynamic_sampling needs a group-relative estimator {relative}: under "
                             f"{self.name} a group of equal rewards still has non-zero advantages")  # fmt: skip
        return self

    @property
    def eps_low(self) -> float:
        return self.clip_eps if self.clip_eps_low is None else self.clip_eps_low

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


class LearnerConfig(StrictModel):
    num_ranks: int = Field(1, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    """Used with 2+ ranks, offload or bf16; one plain rank runs torch directly (ZeRO over one rank
    partitions nothing, it only copies), with the same update."""
    offload: bool = False
    """ZeRO CPU offload of optimizer states (and parameters at stage 3)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    lr: float = Field(3e-5, gt=0)
    """Chosen for the default's short run (24 steps); see benchmarks/README.md for its 3-seed figures."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(16, ge=1)
    """Rows per forward/backward: the default's 16 rows per step in one pass (faster on CPU than two
    passes of 8: benchmarks/README.md)."""
    bf16: bool = False
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A loss or gradient norm that is NaN or infinite on some rank (the ranks agree): `stop` the run
    at that step (the last finite state is saved) or `skip` that optimizer update, logging each one
    and counting them in the metric skipped_updates. Either way non-finite weights are never saved or sent.
    A resumed run may change it (e.g. to skip past the step a run stopped at)."""
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = False
    """The learner and the reference run the model on the step's real tokens packed into rows of
    about pack_tokens, not on rows padded to the longest prompt + longest response: the same
    log-probs, loss and gradients, without compute on padding (docs/performance_packing.md). Off by
    default: on the default's short, evenly sized rows (85% real tokens) packed took 1.07x the
    time (benchmarks/README.md); it pays where lengths vary widely."""
    pack_tokens: int = Field(256, ge=1)
    """About this many tokens per packed row (ceil(step tokens / pack_tokens) rows of near-equal
    length): attention is quadratic in a row's length, so short rows keep it a small share."""
    logits_chunk: int = Field(1024, ge=1)
    """Positions per LM-head chunk: full-vocabulary logits exist for this many positions at a time
    (recomputed in the backward pass when a micro-batch has more), so memory stays flat as responses grow."""

    @model_validator(mode="after")
    def _skip_needs_an_engine_that_drops(self) -> LearnerConfig:
        if self.on_nonfinite == "skip" and self.zero_stage == 0 and self.num_ranks > 1 and not self.bf16:
            raise ValueError("learner.on_nonfinite: skip needs learner.zero_stage >= 1 with several ranks: "
                             "DeepSpeed's ZeRO-0 in fp32 applies a non-finite gradient rather than drop it "
                             "(ZeRO 1-3 and bf16 drop it; zero_stage 1 costs nothing more)")
        return self

    @property
    def packed_row_tokens(self) -> int | None:
        """What the forward passes take: pack_tokens when packing, None for padded rows."""
        return self.pack_tokens if self.packing else None


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


class RunConfig(StrictModel):
    name: str = "rayrlhf"
    seed: int = 0
    steps: int = Field(24, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    """x rollout.samples_per_prompt rows per step; 4 x 4 keeps the default's steps short on 2 CPU cores."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on held-out prompts every N steps (0: only before and after training)."""
    eval_max_new_tokens: int | None = None
    output_dir: str = "outputs/rayrlhf"
    """A local path, a path on a filesystem every node mounts, or a pyarrow.fs URI (s3://, gs://, file://):
    the driver writes logs there and learner rank 0 writes policies there, from whatever node it runs on."""
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    kl: KLConfig = KLConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    monitor: MonitorConfig = MonitorConfig()
    eval: EvalConfig = EvalConfig()
    """How held-out answers are decoded (eval_every and eval_max_new_tokens say when and how long)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    pipeline: PipelineConfig = PipelineConfig()
    env: EnvConfig | None = None
    """A multi-turn environment (docs/environments.md); None: one prompt, one answer."""

    @model_validator(mode="before")
    @classmethod
    def _episode_components(cls, data: object) -> object:
        """With an environment, the episode's fields are reward components: env_reward (weight 1 unless
        listed) trains, env_success / env_turns / env_tool_calls / env_invalid_calls (weight 0) are logged."""
        if not isinstance(data, dict) or not data.get("env"):
            return data
        reward = dict(data.get("reward") or {})
        functions = list(reward.get("functions") or [])
        listed = {f.get("path") for f in functions if isinstance(f, dict)}
        functions += [{"path": name, "weight": 1.0 if name == "env_reward" else 0.0}
                      for name in EPISODE_FIELDS if name not in listed]  # fmt: skip
        return {**data, "reward": {**reward, "functions": functions}}

    @model_validator(mode="before")
    @classmethod
    def _save_every(cls, data: object) -> object:
        """`save_every: N` (the older spelling) means checkpoint.every = N."""
        if isinstance(data, dict) and "save_every" in data:
            data = dict(data)
            every = data.pop("save_every")
            section = dict(data.get("checkpoint") or {})
            if "every" in section and section["every"] != every:
                raise ValueError(f"save_every ({every}) and checkpoint.every ({section['every']}) disagree; give one")
            data["checkpoint"] = {**section, "every": every}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.prompts_per_step % self.rollout.num_workers:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"rollout.num_workers ({self.rollout.num_workers})"
            )
        if self.rollout.num_workers % self.learner.num_ranks and self.learner.num_ranks % self.rollout.num_workers:
            raise ValueError(
                f"rollout.num_workers ({self.rollout.num_workers}) and learner.num_ranks "
                f"({self.learner.num_ranks}) must divide one another"
            )
        if self.prompts_per_step % self.learner.num_ranks:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"learner.num_ranks ({self.learner.num_ranks})"
            )
        if self.algorithm.name in ("grpo", "dr_grpo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"algorithm.name={self.algorithm.name} needs rollout.samples_per_prompt >= 2")
        if self.algorithm.dynamic_sampling.enabled and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "algorithm.dynamic_sampling needs rollout.samples_per_prompt >= 2: a group of one is constant"
            )
        remote = self.reward.remote
        if remote is not None and (remote.retries + 1) * remote.timeout_s >= self.fault_tolerance.score_timeout_s:
            raise ValueError(
                f"reward.remote: {remote.retries + 1} tries of timeout_s={remote.timeout_s:g} do not fit in "
                f"fault_tolerance.score_timeout_s={self.fault_tolerance.score_timeout_s:g}: lower them or raise it"
            )
        if self.env is not None and not self.data.use_chat_template:
            raise ValueError("env needs data.use_chat_template=true: the chat template renders environment messages")
        if self.env is not None and self.eval.num_beams > 1:
            raise ValueError("env: eval.num_beams must be 1 (beam search does not play multi-turn episodes)")
        if self.learner.backend == "nccl" and self.learner.num_gpus <= 0:
            raise ValueError("learner.backend=nccl needs learner.num_gpus > 0")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg_path = resolve_config_path(path)
    data = merge(load_yaml(cfg_path), parse_overrides(overrides or []))
    return validate(RunConfig, data, str(cfg_path))
