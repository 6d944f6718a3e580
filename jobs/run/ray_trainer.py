"""What `train-rm` and `sft` share: a Ray Train TorchTrainer whose workers each drive one DeepSpeed
engine, the per-step data schedule, sharded evaluation, checkpoints and resume.

Ray Train V2 (the default in Ray 2.60) runs the loop on `trainer.num_workers` workers and sets up
torch.distributed among them (gloo on CPU, NCCL on GPU); DeepSpeed finds that process group and
uses it. Results and checkpoints go under `<output_dir>/ray_train/<name>`, never ~/ray_results.
output_dir may be a path or a pyarrow.fs URI (cluster/storage.py): Ray Train writes its checkpoints
there itself; rank 0 writes the job's files (metrics.jsonl, eval.json, final/) from its own node,
staged locally and uploaded with every checkpoint and at the end when output_dir is a URI.
A checkpoint holds every rank's DeepSpeed state (Ray Train merges the ranks' directories) and the
number of optimizer steps done; re-running the same config finds the run's snapshot there and
`ray.train.get_checkpoint()` returns its latest checkpoint, so the loop resumes at that step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import ray
import torch
import yaml

from rayrlhf.actors.runtime.deepspeed_engine import deepspeed_config, init_distributed
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.cluster import worker_logs
from rayrlhf.cluster.actor_group import check_fits
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.run import ClusterConfig
from rayrlhf.jobs.config.supervised import RMConfig, SFTConfig, TrainerConfig
from rayrlhf.jobs.run.run_lock import RunLock
from rayrlhf.jobs.run.tracking import format_table, what_you_have

if TYPE_CHECKING:  # deepspeed probes accelerators at import: imported where a worker needs it
    from deepspeed import DeepSpeedEngine

T = TypeVar("T")

CHECKPOINT_TAG = "engine"
JOB_STATE = "rayrlhf_job_state"
"""Key of the job's own resume state (a small JSON-like dict) inside DeepSpeed's client state."""


def fit(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    trainer: TrainerConfig,
    cluster: ClusterConfig,
    storage: Storage,
    name: str,
    resume: bool,
) -> None:
    """Run `loop(loop_config)` on the Ray Train workers; starts (and stops) a local Ray if none is up."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not resume:
        storage.remove(f"ray_train/{name}")
    started_ray = not ray.is_initialized()
    init_ray(cluster.address, cluster.num_cpus, cluster.object_store_mb)
    if storage.local_path is not None:
        worker_logs.write_to(storage.local_path / "workers.log")
    try:
        per_worker = {"CPU": trainer.cpus_per_worker, **({"GPU": 1.0} if trainer.use_gpu else {})}
        check_fits({k: v * trainer.num_workers for k, v in per_worker.items()})
        TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=trainer.num_workers, use_gpu=trainer.use_gpu, resources_per_worker=per_worker
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage.join("ray_train"),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                failure_config=FailureConfig(max_failures=0),
            ),
        ).fit()
    finally:
        if started_ray:
            shutdown_ray()


# --- inside a worker ------------------------------------------------------------------------


class Worker:
    """One Ray Train worker's rank, its DeepSpeed engine and its reporting."""

    def __init__(self, trainer: dict[str, Any], seed: int, output_dir: str) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.trainer = trainer
        self.storage = Storage(output_dir)
        # rank 0's files: in place for a path; for a URI staged here and uploaded (see `publish`)
        self.output_dir = self.storage.local_path or Path(tempfile.mkdtemp(prefix="rayrlhf-job-"))
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(ctx.get_local_rank()))
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        torch.set_num_threads(trainer["torch_threads"])
        keep_freed_memory(torch.device("cuda" if trainer["use_gpu"] else "cpu"))
        torch.manual_seed(seed)
        if trainer["use_gpu"]:
            import ray.train.torch

            torch.cuda.set_device(ray.train.torch.get_device())
        init_distributed("nccl" if trainer["use_gpu"] else "gloo")  # imports deepspeed: it probes accelerators
        self.engine: DeepSpeedEngine  # set by engine_for

    def engine_for(self, module: torch.nn.Module) -> DeepSpeedEngine:
        """DeepSpeed engine with torch AdamW (DeepSpeed's CPU Adam would be a long JIT build)."""
        import deepspeed

        optimizer = torch.optim.AdamW(
            module.parameters(), lr=self.trainer["lr"], weight_decay=self.trainer["weight_decay"]
        )
        config = deepspeed_config(self.trainer, self.world_size, self.trainer["accumulation"])
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        return self.engine

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def gathered(self) -> contextlib.AbstractContextManager[object]:
        """Full parameters on every rank for the duration (a collective under ZeRO-3)."""
        if self.trainer["zero_stage"] == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def restore(self) -> dict[str, Any] | None:
        """The state saved with the latest Ray Train checkpoint (its "step": optimizer steps done),
        after loading every rank's DeepSpeed state from it; None when starting afresh."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if self.rank == 0:  # a fresh run starts a fresh log; a resumed one continues the stored one
            stored = checkpoint is not None and self.storage.local_path is None and self.storage.exists("metrics.jsonl")
            if checkpoint is None or stored:
                (self.output_dir / "metrics.jsonl").write_text(self.storage.read_text("metrics.jsonl") if stored else "")
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            _, client_state = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if client_state is None or JOB_STATE not in client_state:
            raise RuntimeError(f"checkpoint {checkpoint.path} could not be loaded")
        return client_state[JOB_STATE]

    def report(self, step: int, metrics: dict[str, float], state: dict[str, Any] | None = None) -> None:
        """A Ray Train report from every rank (a barrier); with `state` (which must hold "step"),
        a checkpoint of every rank's DeepSpeed state plus `state`. Rank 0 also appends the
        metrics to <output_dir>/metrics.jsonl."""
        import ray.train

        metrics = {"step": step, **metrics}
        if self.rank == 0:  # the console shows them already: Ray Train logs every report
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={JOB_STATE: state})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.publish()

    def publish(self) -> None:
        """Rank 0's files so far to output_dir (nothing to do for a path: they are written in place)."""
        if self.rank == 0 and self.storage.local_path is None:
            self.storage.upload(self.output_dir)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def sharded_sums(self, items: Sequence[T], batch_size: int, fn: Callable[[list[T]], list[float]]) -> list[float]:
        """Sum of fn(batch) over this rank's share of items, then over ranks. Every rank runs the
        same number of forward passes (ZeRO-3 gathers parameters collectively): a rank with
        fewer items runs its last batches on items[:1] and drops the result."""
        share = list(items[self.rank :: self.world_size])
        batches = math.ceil(math.ceil(len(items) / self.world_size) / batch_size)
        total: list[float] | None = None
        for b in range(batches):
            rows = share[b * batch_size : (b + 1) * batch_size]
            sums = fn(rows or list(items[:1]))
            if not rows:
                sums = [0.0] * len(sums)
            total = sums if total is None else [t + s for t, s in zip(total, sums)]
        return self.all_sum(total or [])

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.rank == 0:
            (self.output_dir / name).write_text(json.dumps(data, indent=2))

    def run(
        self,
        num_items: int,
        seed: int,
        micro_step: Callable[[list[int]], float],
        evaluate: Callable[[], dict[str, float]],
        save_final: Callable[[dict[str, float], Path], object],
    ) -> None:
        """The loop both jobs share: resume, optimizer steps (`micro_step(indices)` runs forward,
        backward and engine.step on one micro-batch and returns its loss), held-out metrics
        before, every `eval_every` steps and after, checkpoints every `checkpoint_every` steps
        and at the end, then `save_final(after, folder)` on rank 0 with full weights (a local folder that
        becomes output_dir/final), and eval.json."""
        trainer = self.trainer

        def held_out() -> dict[str, float]:
            self.engine.eval()
            with torch.no_grad():
                metrics = evaluate()
            self.engine.train()
            return metrics

        state = self.restore() or {"step": 0, "before": held_out()}
        steps = total_steps(num_items, trainer)
        for step in range(state["step"], steps):
            schedule = step_indices(
                num_items, step, seed, self.rank, self.world_size, trainer["micro_batch_size"], trainer["accumulation"]
            )
            start = time.perf_counter()
            losses = [micro_step(indices) for indices in schedule]
            metrics = {"loss": self.all_sum([sum(losses) / len(losses)])[0] / self.world_size}
            metrics["time/step"] = time.perf_counter() - start
            done = step + 1
            if trainer["eval_every"] and done % trainer["eval_every"] == 0 and done < steps:
                metrics.update(held_out())
            checkpoint = trainer["checkpoint_every"] and done % trainer["checkpoint_every"] == 0 and done < steps
            self.report(done, metrics, {**state, "step": done} if checkpoint else None)
        after = held_out()
        self.report(steps, after, {**state, "step": steps})
        with self.gathered():
            if self.rank == 0:
                with self.storage.child("final").writable_dir() as folder:
                    save_final(after, folder)
        self.write_json("eval.json", {"before": state["before"], "after": after})
        self.publish()
        if self.storage.local_path is None:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # the staging copy, uploaded


def run_job(
    cfg: SFTConfig | RMConfig, loop: Callable[[dict[str, Any]], None], inputs: dict[str, Any], final_label: str
) -> tuple[Path | str, Path | str, dict[str, Any]]:
    """The driver side shared by sft and train-rm: record the config, fit, print before/after.
    Returns output_dir and its final/ (paths for a path, locations for a URI) and eval.json."""
    storage = Storage(cfg.output_dir)
    with RunLock(storage, cfg.name):  # one job per output_dir (jobs/run/run_lock.py)
        storage.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        loop_config = {"cfg": cfg.model_dump(), "output_dir": storage.location, **inputs}
        fit(loop, loop_config, cfg.trainer, cfg.cluster, storage, cfg.name, cfg.resume)
    result = json.loads(storage.read_text("eval.json"))
    places = {final_label: storage.shown("final"), "metrics": storage.shown("metrics.jsonl")}
    if storage.local_path is not None:  # fit() writes it there
        places["worker logs"] = storage.shown("workers.log")
    served = storage.shown("final") if final_label == "final policy" else None  # a reward model is not served
    print("\n" + format_table(result["before"], result["after"]) + "\n\n" + what_you_have(places, served))
    return storage.shown(), storage.shown("final"), result


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def step_indices(n: int, step: int, seed: int, rank: int, world_size: int, micro: int, accumulation: int) -> list[list[int]]:
    """Item indices of each micro-batch that `rank` takes in optimizer step `step` (counted from 0
    over all epochs). Each epoch is a seeded permutation cut into equal steps (the remainder is
    dropped), so every rank runs the same number of steps and a resumed run continues exactly."""
    per_step = micro * accumulation * world_size
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training items cannot fill one step of {per_step} (micro_batch_size x accumulation x workers)")
    epoch, k = divmod(step, steps_per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    out = []
    for a in range(accumulation):
        start = ((k * accumulation + a) * world_size + rank) * micro
        out.append(order[start : start + micro])
    return out


def total_steps(n: int, trainer: dict[str, Any]) -> int:
    steps = trainer["epochs"] * (n // (trainer["micro_batch_size"] * trainer["accumulation"] * trainer["num_workers"]))
    return min(steps, trainer["max_steps"]) if trainer["max_steps"] else steps


def check_data_fills_a_step(n: int, trainer: TrainerConfig, what: str) -> None:
    """A clear error before Ray starts, instead of a failed worker."""
    per_step = trainer.micro_batch_size * trainer.accumulation * trainer.num_workers
    if n < per_step:
        from rayrlhf.jobs.config.base import ConfigError

        raise ConfigError(
            f"data.train has {n} {what}, fewer than one step needs (trainer.micro_batch_size x "
            f"trainer.accumulation x trainer.num_workers = {per_step})"
        )


