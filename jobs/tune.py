"""`rayrlhf tune`: a Ray Tune search over the reward weights, each trial a full RL run.

Each trial runs jobs/train.py `train()` unchanged, with the trial's weights, in a placement group
that reserves the trial's driver and every role actor together (cluster/actor_group.py places the
roles in it), so concurrent trials never starve each other and concurrency follows the cluster.
The objective is a held-out metric (ROUGE-L against references by default), never the tuned
reward; it is reported at every evaluation so ASHA can stop weak trials early.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage, is_uri
from rayrlhf.jobs.run import checkpoint, pbt
from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.config.tune import (
    ObjectiveConfig,
    ParamSpec,
    SearchConfig,
    TuneSetup,
)
from rayrlhf.jobs.run.roles import bundles
from rayrlhf.jobs.train import TrainResult, train
from rayrlhf.jobs.run.tune_report import TuneSummary, summarize

OBJECTIVE = "objective"
"""The name Tune optimises: the chosen held-out metric, worst-valued when over the KL budget."""


def trial_resources(setup: TuneSetup, config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """Bundle 0: the trial's driver; then every role actor of the trial's run config."""
    cfg = setup.run_config(setup.cfg.search.field_values(config))
    return tune.PlacementGroupFactory(
        [{"CPU": setup.cfg.trial_cpus}, *bundles(cfg)], strategy=cfg.cluster.placement_strategy
    )


def reports_per_trial(cfg: RunConfig) -> int:
    """Held-out evaluations a trial reports: every eval_every steps before the last, then the final one."""
    every = cfg.eval_every
    return sum(1 for step in range(1, cfg.steps) if every and step % every == 0) + 1


class ObjectiveReporter:
    """Turns train()'s metrics into Tune reports: the objective, KL, components and weights; a run
    checkpoint written at that step goes with the report (Tune copies it into the trial's storage,
    so the run's own copy is removed)."""

    def __init__(self, objective: ObjectiveConfig, fields: dict[str, float], run_dir: Path | None = None) -> None:
        self.objective = objective
        self.run_dir = run_dir
        self.weights = {f"weight/{name}": value for name, value in fields.items()}
        self.kl = 0.0

    def metrics(self, evaluated: dict[str, float]) -> dict[str, Any]:
        name = self.objective.metric
        if name not in evaluated:
            held_out = sorted(k for k in evaluated if k.startswith("eval/"))
            raise KeyError(f"objective.metric {name!r} is not a held-out metric of this run; it has {held_out}")
        over = self.objective.kl_budget is not None and self.kl > self.objective.kl_budget
        worst = -math.inf if self.objective.mode == "max" else math.inf
        return {
            OBJECTIVE: worst if over else evaluated[name], "kl": self.kl, "kl_over_budget": float(over),
            **{k: v for k, v in evaluated.items() if k.startswith(("eval/", "reward/"))}, **self.weights,
        }

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.kl = metrics.get("kl", 0.0)
        if any(k.startswith("eval/") for k in metrics):
            saved = checkpoint.at_step(self.run_dir, step) if self.run_dir else None
            report = tune.Checkpoint.from_directory(str(saved)) if saved else None
            # checkpoint_step: PBT's clock (a report without a checkpoint, the final one, never perturbs)
            at = {"checkpoint_step": step} if saved else {}
            tune.report({**self.metrics(metrics), "step": step, "final": 0.0, **at}, checkpoint=report)
            if saved:
                checkpoint.remove(saved)

    def final(self, result: TrainResult) -> None:
        """Report the last evaluation and the final policy's folder (inside the trial's folder).

        The path is reported rather than a Tune Checkpoint, which would copy the whole model
        (540 MB for SmolLM2) once more per trial.
        """
        last = result.history[-1] if result.history else {}
        train_rewards = {k: v for k, v in last.items() if k.startswith("reward/")}
        steps = int(last.get("step", 0))
        tune.report({
            **self.metrics({**train_rewards, **result.after}), "step": steps, "final": 1.0,
            "policy_dir": str(result.final_dir),
        })


def run_trial(config: dict[str, Any], setup: TuneSetup, workdir: str) -> None:
    """One trial: train() with the trial's weights, writing its run inside the trial's folder.

    A trial checkpoints at every evaluation it reports (unless the run config says otherwise); a
    retried or restored trial continues from its last reported checkpoint, not from step 0."""
    if os.path.isdir(workdir):
        os.chdir(workdir)  # relative paths in the run config mean what they meant to the user
    context = tune.get_context()
    fields = setup.cfg.search.field_values(config)
    # get_trial_dir() is Tune's local staging copy; the run goes straight to the trial's folder in storage
    trial_dir = f"{setup.cfg.experiment_dir()}/{Path(context.get_trial_dir()).name}"
    cfg = setup.run_config(fields, output_dir=f"{trial_dir}/run", name=f"{setup.cfg.name}-{context.get_trial_id()}")
    on_uri = is_uri(cfg.output_dir)  # its run checkpoints live in the bucket, not where Tune can take them
    if cfg.eval_every and not cfg.checkpoint.every and not on_uri:
        cfg.checkpoint.every = cfg.eval_every
    reporter = ObjectiveReporter(setup.cfg.objective, fields, None if on_uri else Path(cfg.output_dir))
    last = tune.get_checkpoint()
    retune = setup.cfg.search.algorithm == "pbt"
    if last and not on_uri:  # the run's own earlier checkpoints predate Tune's (after a PBT exploit, another trial's)
        checkpoint.clear(Path(cfg.output_dir))
    with last.as_directory() if last else contextlib.nullcontext("never") as resume:
        if retune:  # the donor: the trial whose folder holds the checkpoint
            donor = Path(last.path).parent.name if last else None
            record_start(Path(trial_dir), fields, Path(resume) if last else None, donor)
        reporter.final(train(cfg, on_step=reporter.on_step, resume=resume, retune=retune))


def record_start(trial_dir: Path, fields: dict[str, float], resume: Path | None, donor: str | None) -> None:
    """A PBT trial's start in its events file: the first one, or one from `donor`'s checkpoint under
    other settings (an exploit, with its step); a pause, a retry or a restored search records nothing."""
    trial = trial_dir.name
    event: dict[str, Any] | None
    if resume is None:
        event = {"step": 0, "kind": "start", "trial": trial, "donor": trial, "before": {}, "after": fields}
    else:
        manifest, saved, _ = checkpoint.read(resume)
        event = pbt.change_event(manifest["step"], trial, donor or trial, pbt.settings_of(saved, list(fields)), fields)
    if event is not None and pbt.append_event(trial_dir, event) and event["kind"] != "start":
        before = event["before"]
        changes = ", ".join(f"{k} {before[k]:.4g} -> {v:.4g}" for k, v in fields.items() if before[k] != v)
        print(f"PBT {event['kind']} at step {event['step']}: from {event['donor']}'s checkpoint, {changes}", flush=True)


def param_space(spec: dict[str, ParamSpec], algorithm: str) -> dict[str, Any]:
    def domain(p: ParamSpec) -> Any:
        if algorithm == "grid":  # the schema gives every dimension of a grid its values
            return tune.grid_search(p.bounds())
        if p.values is not None:
            return tune.choice(p.values)
        return (tune.loguniform if p.log else tune.uniform)(*p.bounds())

    return {name: domain(p) for name, p in spec.items()}


def make_tuner(setup: TuneSetup, trainable: type[tune.Trainable]) -> tune.Tuner:
    cfg = setup.cfg
    first = setup.check()
    searcher: Searcher | SearchAlgorithm | None = None
    if cfg.search.algorithm == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=TPESampler(seed=cfg.search.seed))
    elif cfg.search.algorithm in ("random", "pbt"):  # pbt: the initial population
        searcher = BasicVariantGenerator(random_state=cfg.search.seed)
    scheduler: TrialScheduler | None = None
    keep = first.checkpoint.keep
    if cfg.search.algorithm == "pbt":
        scheduler = pbt_scheduler(cfg.search)
        keep = max(keep, 3)  # a donor's checkpoint must outlive its next one or two until the weak trial took it
    elif cfg.asha.enabled:
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=max(reports_per_trial(first), cfg.asha.grace_period),
            grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor, stop_last_trials=False,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.search.dimensions(), cfg.search.algorithm),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode=cfg.objective.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=cfg.search.samples(), max_concurrent_trials=cfg.search.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=cfg.storage_location(),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        ),
    )


def pbt_scheduler(search: SearchConfig) -> PopulationBasedTraining:
    """PBT over the search space, on the trials' run steps: each report with a checkpoint is a chance
    to perturb; perturbed values are kept inside their ranges."""
    dims = search.dimensions()
    ranges = {name: spec.bounds() for name, spec in dims.items() if spec.values is None}
    return PopulationBasedTraining(
        time_attr="checkpoint_step", perturbation_interval=search.pbt.interval,
        hyperparam_mutations=param_space(dims, "pbt"), quantile_fraction=search.pbt.quantile_fraction,
        resample_probability=search.pbt.resample_probability, synch=search.pbt.synch,
        custom_explore_fn=functools.partial(pbt.clip, bounds=ranges), require_attrs=False,
    )


def expected_trials(setup: TuneSetup) -> int:
    search = setup.cfg.search
    if search.algorithm != "grid":
        return search.samples()
    return search.samples() * math.prod(len(spec.bounds()) for spec in search.dimensions().values())


@dataclass
class TuneOutcome:
    summary: TuneSummary
    resumed: bool
    interrupted: bool


def tune_weights(setup: TuneSetup) -> TuneOutcome:
    """Run (or resume) the search, then write the table, the plot and the best config."""
    first = setup.check()  # every corner of the space validates before Ray starts
    exp_dir = setup.cfg.experiment_dir()
    started_ray = not ray.is_initialized()
    init_ray(first.cluster.address, first.cluster.num_cpus, first.cluster.object_store_mb)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup, workdir=os.getcwd()), functools.partial(trial_resources, setup)
    )
    try:
        resumed = tune.Tuner.can_restore(exp_dir)
        if resumed:
            print(f"resuming the search in {exp_dir} (finished trials are kept; change `name` for a new search)")
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = make_tuner(setup, trainable)
        grid = tuner.fit()
    finally:
        if started_ray:
            shutdown_ray()
    summary = summarize(setup, grid, Storage(exp_dir))
    concluded = len(summary.rows)  # done, stopped early or failed
    interrupted = len(grid) > grid.num_terminated + grid.num_errors or concluded < expected_trials(setup)
    if interrupted:
        print(f"search interrupted; run the same command again to resume it from {exp_dir}")
    return TuneOutcome(summary, resumed, interrupted)
