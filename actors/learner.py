"""The learner role: one DeepSpeed rank that updates the policy from scored trajectories.

A plain class; the driver starts N of them as Ray actors with the same master address, and they
rendezvous through torch.distributed. Each rank receives its own shard of whole prompt groups
(`rows_per_step` rows); one optimizer step happens per pass over them (gradient accumulation
over micro-batches), `epochs` passes per RL step.

Algorithms come from the tables of actors/rl/algorithms.py: algorithm.name picks the advantage
estimator ("grpo", "dr_grpo" and "reinforce" put per-sequence advantages on every response token and
the KL to the reference in the loss; "ppo" adds a value head on the shared backbone, puts the KL in the
per-token reward, and uses whitened GAE advantages, whitened per rank; "reinforce_pp" whitens the
returns of that reward, without a critic), algorithm.policy_loss the policy loss, and
algorithm.loss_aggregation its normaliser, taken over the whole step (all micro-batches and ranks).
The reported `kl` uses kl.estimator for every algorithm (PPO's reward always uses k1).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from rayrlhf.actors.rl.algorithms import ADVANTAGE_ESTIMATORS, load
from rayrlhf.actors.runtime.devices import select_device, set_deepspeed_accelerator
from rayrlhf.actors.runtime.deepspeed_engine import deepspeed_engine, use_plain_engine
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.rl.logprobs import PolicyOutput, first_response_column, policy_forward
from rayrlhf.actors.rl.nonfinite import NonFiniteError
from rayrlhf.actors.rl.losses import make_kl_controller
from rayrlhf.actors.runtime.cpu_linear import pack_linears
from rayrlhf.actors.runtime.models import add_lora, load_policy, merged_state_dict, resolve_policy_here, save_policy
from rayrlhf.actors.rl.objective import Objective
from rayrlhf.actors.rl.offpolicy import admitted
from rayrlhf.actors.rl.shard import unpack
from rayrlhf.actors.rl.token_batch import TokenBatch
from rayrlhf.actors.runtime.plain_engine import PlainEngine
from rayrlhf.actors.rl.trajectory import LearnerBatch
from rayrlhf.actors.runtime.weight_sync import BroadcastGroup, Weights

if TYPE_CHECKING:  # the schema's sections, checked before they get here; no runtime import of jobs/
    from rayrlhf.jobs.config.run import AlgorithmConfig, KLConfig, LearnerConfig, LoraConfig, PipelineConfig


class Destination(Protocol):
    """Where a saved policy goes (cluster/storage.py's Storage, built by the driver): a local directory
    to write into, which reaches the user's storage when the block ends."""

    def writable_dir(self) -> AbstractContextManager[Path]: ...


class Source(Protocol):
    """Where a saved state is read from (a Storage too): a local directory holding it for the block,
    downloaded onto this node when the storage is not a path."""

    def readable_dir(self) -> AbstractContextManager[Path]: ...


class StaleTrajectoryError(RuntimeError):
    """A trajectory sampled by a policy version the learner may not train on: a newer one, or one more
    than pipeline.max_staleness versions older than its own."""


class PolicyWithValue(nn.Module):
    """The policy plus an optional zero-initialised value head on its last hidden state;
    one module so that DeepSpeed shards and steps both."""

    def __init__(
        self, policy: nn.Module, with_value: bool, pack_tokens: int | None, logits_chunk: int,
        share_prompts: bool = False,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.pack_tokens, self.logits_chunk, self.share_prompts = pack_tokens, logits_chunk, share_prompts
        self.value_head = None
        if with_value:
            self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float,
        entropy_grad: bool,
        first_scored: int,
    ) -> tuple[PolicyOutput, torch.Tensor | None]:
        out = policy_forward(
            self.policy,
            input_ids,
            attention_mask,
            temperature,
            with_entropy=True,
            entropy_grad=entropy_grad,
            with_hidden=self.value_head is not None,
            first_scored=first_scored,
            pack_tokens=self.pack_tokens,
            share_prompts=self.share_prompts,
            logits_chunk=self.logits_chunk,
        )
        values = None
        if self.value_head is not None:  # values[:, t] = V(state in which token t is chosen)
            values = self.value_head(out.hidden).squeeze(-1).float()
        return out, values


def disable_dropout(model: nn.Module) -> None:
    """RL needs the learner's log-probs to match the rollout's (eval-mode) ones."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class Learner:
    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model: str,
        seed: int,
        temperature: float,
        rows_per_step: int,
        algorithm: AlgorithmConfig,
        kl: KLConfig,
        learner: LearnerConfig,
        device: str = "cpu",
        cache_dir: str | None = None,
        lora: LoraConfig | None = None,
        pipeline: PipelineConfig | None = None,
        off_policy_data: bool = False,
    ):
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0",  # one process (and at most one GPU) per actor
        )  # fmt: skip
        # DeepSpeed's ZeRO-3 calls torch.distributed functions that warn on every step.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        torch.set_num_threads(learner.torch_threads)
        torch.manual_seed(seed)
        device_type = select_device(device)
        keep_freed_memory(device_type)
        set_deepspeed_accelerator(device_type)  # before DeepSpeed is first imported (deepspeed_engine)
        self.rank, self.world_size = rank, world_size
        self.algorithm, self.temperature, self.rows_per_step = algorithm, temperature, rows_per_step
        self.kl_ctl = make_kl_controller(kl)
        self.zero_stage = learner.zero_stage
        self.accumulation = math.ceil(rows_per_step / learner.micro_batch_size)
        self.micro_batch_size = learner.micro_batch_size
        self.plain = use_plain_engine(world_size, learner)
        self.skip_nonfinite, self.bf16 = learner.on_nonfinite == "skip", learner.bf16
        self.max_staleness = pipeline.max_staleness if pipeline else 0
        self.estimator = ADVANTAGE_ESTIMATORS[algorithm.name]
        self.estimate_advantages = load(self.estimator.function)
        off_policy = self.max_staleness or off_policy_data  # recorded episodes: a behaviour policy of their own
        self.objective = Objective(algorithm, kl.estimator, pipeline.is_cap if pipeline and off_policy else None)

        # fp32 master weights; DeepSpeed casts the module to bf16 itself when learner.bf16 is on
        self.policy, self.tokenizer = load_policy(resolve_policy_here(model, cache_dir), "float32", device_type)
        disable_dropout(self.policy)
        if learner.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:  # only the adapters train; get_weights and save merge them in
            self.policy = add_lora(self.policy, lora.rank, lora.alpha, lora.target_modules)
        module = PolicyWithValue(self.policy, with_value=self.estimator.critic,
                                 pack_tokens=learner.packed_row_tokens, share_prompts=learner.share_prompts,
                                 logits_chunk=learner.logits_chunk).train()  # fmt: skip
        trainable = [p for p in module.parameters() if p.requires_grad]
        # fused: one kernel per tensor instead of ~10 passes over it (the default on CPU); the same
        # update up to float rounding, and a quarter of the learn phase less on this CPU.
        optimizer = torch.optim.AdamW(trainable, lr=learner.lr, weight_decay=learner.weight_decay, fused=True)
        if self.plain:
            pack_linears(self.policy, optimizer)  # one fp32 rank (ZeRO's hooks around packed layers are not tested)
            module.to(device_type)
            self.engine = PlainEngine(module, optimizer, self.accumulation, learner.grad_clip)
        else:
            self.engine = deepspeed_engine(module, optimizer, learner, world_size, self.accumulation, device_type)
        self.device = self.engine.device
        self.version = 0
        self._diverged: str | None = None
        """Why these weights must never be saved or sent (actors/rl/nonfinite.py), once an applied update diverged."""
        self._weight_group: BroadcastGroup | None = None

    # --- weights -------------------------------------------------------------------------

    def _gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters on every rank for the duration (a collective under ZeRO-3)."""
        if self.zero_stage == 3 and not self.plain:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _check_not_diverged(self) -> None:
        if self._diverged is not None:
            raise NonFiniteError(f"refusing to save or send diverged weights ({self._diverged})")

    def get_weights(self) -> Weights | None:
        """Collective: rank 0 gets the policy's full state dict (HF names, in the dtype it trains in:
        bf16 stays bf16); others None."""
        self._check_not_diverged()
        with self._gathered():
            if self.rank != 0:
                return None
            return Weights.from_state_dict(merged_state_dict(self.policy))

    def join_weight_group(self, master_addr: str, master_port: int, world_size: int, backend: str) -> None:
        """Rank 0 only: become rank 0 of the broadcast group with the rollout workers (blocks until all joined)."""
        self._weight_group = BroadcastGroup(master_addr=master_addr, master_port=master_port, rank=0,
                                            world_size=world_size, backend=backend, device=self.device)  # fmt: skip

    def broadcast_weights(self, dtypes: dict[str, str]) -> None:
        """Collective (under ZeRO-3 every rank gathers): rank 0 broadcasts to the rollout workers, in their dtypes."""
        self._check_not_diverged()
        with self._gathered():
            if self.rank == 0:
                self._weight_group.send(self.policy.state_dict(), {k: getattr(torch, v) for k, v in dtypes.items()})

    def save(self, destination: Destination) -> str | None:
        """Collective: rank 0 writes a Hugging Face directory (safetensors + tokenizer) to `destination`,
        from whatever node it runs on; returns where (a path or a storage URI)."""
        self._check_not_diverged()
        with self._gathered():
            if self.rank != 0:
                return None
            with destination.writable_dir() as local:
                save_policy(self.policy, self.tokenizer, local)
            return str(destination)

    # --- run checkpoint (jobs/run/checkpoint.py decides where) ---------------------------------

    def save_checkpoint(self, destination: Destination) -> dict[str, Any]:
        """Collective: every rank writes its DeepSpeed engine state (weights, optimizer, ZeRO
        partitions, LR schedule) to `destination` from its own node (the ranks' files merge there);
        returns what the driver keeps beside it."""
        self._check_not_diverged()
        with destination.writable_dir() as folder:
            self.engine.save_checkpoint(str(folder), tag="state", save_latest=False)
        return {"version": self.version, "kl_coef": float(self.kl_ctl.value)}

    def load_checkpoint(self, source: Source, state: dict[str, Any], overrides: dict[str, float] | None = None) -> int:
        """Collective: the inverse of save_checkpoint, on a group of the same size and ZeRO stage
        (each rank reads the saved state on its own node). `overrides` ({"lr", "kl_coef"}, a PBT
        perturbation) win over the restored optimizer's learning rate and KL controller's value."""
        with source.readable_dir() as folder:
            path, _ = self.engine.load_checkpoint(str(folder), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {source}")
        self.version = int(state["version"])
        overrides = overrides or {}
        self.kl_ctl.value = float(overrides.get("kl_coef", state["kl_coef"]))
        if "lr" in overrides:
            for group in self.engine.optimizer.param_groups:  # DeepSpeed's ZeRO optimizer shares its inner groups
                group["lr"] = overrides["lr"]
        return self.version

    # --- training ------------------------------------------------------------------------

    def _forward(self, rows: TokenBatch, entropy_grad: bool) -> tuple[PolicyOutput, torch.Tensor | None]:
        first = first_response_column(rows.response_mask)
        return self.engine(rows.input_ids, rows.attention_mask, self.temperature, entropy_grad, first)

    @torch.no_grad()
    def _values(self, batch: TokenBatch) -> torch.Tensor:
        """The critic's values under the weights that sampled, before any update (row slices, whole width)."""
        values = torch.zeros_like(batch.response_mask)
        for start in range(0, len(batch), self.micro_batch_size):
            rows = batch.rows(start, start + self.micro_batch_size)
            _, rows_values = self._forward(rows, entropy_grad=False)
            values[start : start + self.micro_batch_size] = rows_values * rows.response_mask
        return values

    def _with_advantages(self, batch: TokenBatch, kl_coef: float) -> TokenBatch:
        """The batch with the estimator's advantages (and a critic's pre-update values and returns)."""
        if self.estimator.critic:
            batch = replace(batch, old_values=self._values(batch))
        advantages, returns = self.estimate_advantages(batch, kl_coef, self.algorithm)
        return replace(batch, advantages=advantages, returns=returns)

    def _loss(
        self, rows: TokenBatch, kl_coef: float, units: float
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """The micro-batch's loss and metrics, and the proximal log-probs to keep for later epochs."""
        out, values = self._forward(rows, entropy_grad=self.algorithm.entropy_coef > 0)
        # the first pass runs under the pre-update weights (one step per pass): the proximal policy
        proximal = out.logprobs.detach() if rows.proximal_logprobs is None else rows.proximal_logprobs
        loss, stats = self.objective(rows, out.logprobs, out.entropy, values, proximal, kl_coef, units)
        return loss, stats, proximal

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO-0 in fp32 does not record it: grads are still on the params
            grads = [p.grad.float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else 0.0
        return float(norm)

    def learn_parts(self, *parts: Any) -> tuple[dict[str, float], list[int]]:
        """`learn` on this rank's shards as the driver sends them (actors/rl/shard.py). Joined here, where Ray
        resolved them (a separate join task cost a worker start every step). Also returns the sample ids trained."""
        batch = LearnerBatch.join(*unpack(parts))
        return self.learn(batch), batch.trajectory.sample_ids.tolist()

    def learn(self, shard: LearnerBatch) -> dict[str, float]:
        """One RL step on this rank's share of the step; returns metrics averaged over ranks."""
        start = time.perf_counter()
        traj = shard.trajectory
        staleness = self.version - traj.policy_version
        if not admitted(self.version, traj.policy_version, self.max_staleness):
            raise StaleTrajectoryError(
                f"trajectory sampled by policy version {traj.policy_version}, but the learner is at "
                f"version {self.version} and accepts versions {self.version - self.max_staleness}..{self.version} "
                f"(pipeline.max_staleness={self.max_staleness})"
            )
        if len(shard) != self.rows_per_step:
            raise ValueError(f"this rank expects {self.rows_per_step} rows per step, got {len(shard)}")
        kl_coef = float(self.kl_ctl.value)
        batch = self._with_advantages(TokenBatch.from_shard(shard, self.device), kl_coef)

        sums: dict[str, float] = {}
        grad_norms, finite_losses, skipped = [], 0, 0
        micro = batch.micro_batches(self.micro_batch_size)
        # the engine averages the micro-batch losses over micro-batches and ranks (actors/rl/aggregation.py)
        units = self._sum_over_ranks(self.objective.units(batch.response_mask)) / (len(micro) * self.world_size)
        applied = False  # an optimizer step of this call has changed the weights (actors/rl/nonfinite.py)
        poisoned = False  # a loss of this accumulation window was not finite (learner.on_nonfinite: skip)
        for _ in range(self.algorithm.epochs):
            for i, rows in enumerate(micro):
                loss, stats, proximal = self._loss(rows, kl_coef, units)
                if self._finite(stats["loss"], f"the loss of micro-batch {i}", applied):
                    finite_losses += 1
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                else:  # skip: NaN gradients, so the window's update is dropped at its boundary
                    loss, poisoned = loss * float("nan"), True
                if rows.proximal_logprobs is None:  # kept from the first epoch for the later ones
                    micro[i] = replace(rows, proximal_logprobs=proximal)
                self.engine.backward(loss)
                if not self.engine.is_gradient_accumulation_boundary():
                    self.engine.step()
                    continue
                norm, took = self._optimizer_step(applied, quiet=poisoned)
                if took:
                    grad_norms.append(norm)
                    applied = True
                else:
                    skipped += 1
                poisoned = False
        metrics = {key: value / finite_losses if finite_losses else math.nan for key, value in sums.items()}
        metrics["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan  # of the updates applied
        metrics["skipped_updates"] = float(skipped)
        metrics["reward_mean"] = float(shard.raw_scores.mean())  # unnormalised: comparable across steps
        metrics["response_length"] = float(traj.response_lengths.mean())
        metrics["tokens"] = float(traj.response_mask.sum())
        metrics = self._mean_over_ranks(metrics)
        metrics["tokens"] *= self.world_size  # the total over ranks
        metrics["kl_coef"] = kl_coef
        metrics["lr"] = float(self.engine.optimizer.param_groups[0]["lr"])  # in force: PBT may have changed it
        metrics["pipeline/staleness"] = float(staleness)
        if math.isfinite(metrics["kl"]):  # not when every loss of a skipping step was non-finite
            self.kl_ctl.update(metrics["kl"], len(traj) * self.world_size)
        self.version += 1
        metrics["version"] = float(self.version)
        metrics["learn_seconds"] = time.perf_counter() - start
        return metrics

    def _optimizer_step(self, applied: bool, quiet: bool) -> tuple[float, bool]:
        """The accumulation boundary's update; returns the gradient norm and whether the update was applied.
        A non-finite norm stops the step, or (learner.on_nonfinite: skip) drops the update: the plain
        engine, DeepSpeed's ZeRO 1-3 and its bf16 optimizer drop it themselves (DeepSpeed 0.19 treats a
        non-finite norm as an overflow) and count it in `skipped_steps`. DeepSpeed's ZeRO-0 in fp32
        applies any gradient: its norm is read first, to stop before the update. `applied`, `quiet`:
        see _finite."""
        if self.zero_stage == 0 and not self.plain and not self.bf16:
            norm = self._grad_norm()  # before step() clears the gradients
            self._finite(norm, "the gradient norm", applied, stop=True)  # skip is refused here (jobs/config/training.py)
            self.engine.step()
            return norm, True
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        took = self.engine.skipped_steps == skipped_before
        norm = self._grad_norm() if took else math.inf  # a dropped one's (ZeRO-3 keeps the last norm it applied)
        if not math.isfinite(norm):  # the norm and the skip are global: every rank comes here, or none
            self._finite(norm, "the gradient norm", applied or took, quiet=quiet, stop=took)
        return norm, took

    def _finite(self, value: float, what: str, applied: bool, quiet: bool = False, stop: bool = False) -> bool:
        """Whether `value` is finite on every rank (one all-reduce, so the ranks act alike). If not, it stops
        the step: NonFiniteError naming the step, the ranks and the quantity; or, with learner.on_nonfinite:
        skip and unless `stop`, returns False (the update is to be dropped), logging it on rank 0 unless
        `quiet` (already logged for its loss). `applied`: an update of this step already changed the
        weights, which are then marked diverged (never saved or sent)."""
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        flags[self.rank] = 0.0 if math.isfinite(value) else 1.0
        if self.world_size > 1:
            torch.distributed.all_reduce(flags)
        bad = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if not bad:
            return True
        where = f"step {self.version + 1}: {what} is not finite on learner rank(s) {bad}"
        if self.skip_nonfinite and not stop:
            if self.rank == 0 and not quiet:
                print(f"WARNING {where}; its update is skipped (learner.on_nonfinite: skip)", file=sys.stderr,
                      flush=True)  # fmt: skip
            return False
        message = (f"{where}; " + ("an update of this step was applied, so these weights are kept from every "
                                   "checkpoint and rollout worker" if applied else "no update of this step was applied")
                   + ": lower learner.lr, check the rewards, or set learner.on_nonfinite: skip")  # fmt: skip
        if applied:
            self._diverged = message
        raise NonFiniteError(message)

    def _sum_over_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total)

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank must see the same KL so that their KL controllers stay identical."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist())}
