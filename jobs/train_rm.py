"""`rayrlhf train-rm`: train a scalar reward model on Ray Train workers with DeepSpeed inside.

The model is a pretrained backbone with a scalar head (actors/rewards/reward_model.py); the loss is one
of actors/supervised/rm_losses.py. It reports held-out pairwise accuracy (per rejection kind when the data
says) or, on rated samples, MSE and label accuracy, before and after training, and writes the
model as a Hugging Face directory (`<output_dir>/final`) that `reward.rm_model` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from rayrlhf.actors.runtime.models import resolve_here
from rayrlhf.actors.rewards.reward_model import RewardModel, resolve_backbone
from rayrlhf.actors.supervised.rm_losses import PAIRWISE, objective
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.supervised import RMConfig
from rayrlhf.jobs.data.preferences import PreferencePair
from rayrlhf.jobs.data.supervised import RatedSample, RMRow, is_pairs, load_rm_data
from rayrlhf.jobs.run.ray_trainer import Worker, check_data_fills_a_step, run_job, to_device

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass
class RMResult:
    output_dir: Path | str
    """A path for a path output_dir, the URI for a URI (so is final_dir)."""
    final_dir: Path | str
    before: dict[str, float]
    after: dict[str, float]


def rm_inputs(rows: list[RMRow], loss: str) -> tuple[list[str], list[str], torch.Tensor, int]:
    """(prompts, responses, targets, num_pairs) in the layout `rm_losses.objective` expects:
    pairs as all chosen rows then all rejected ones (targets 1 and 0); rated rows in order,
    targets their labels (cross_entropy, focal) or scores (mse; the label if a row has none)."""
    if is_pairs(rows):
        pairs = cast(list[PreferencePair], rows)  # a data set is all pairs or all rated samples
        n = len(pairs)
        prompts = [r.prompt for r in pairs] * 2
        responses = [r.chosen for r in pairs] + [r.rejected for r in pairs]
        return prompts, responses, torch.tensor([1.0] * n + [0.0] * n), n
    rated = cast(list[RatedSample], rows)
    # every rated row has a score or a label (the loader), and a label where the loss needs one (prepare)
    if loss == "mse":
        targets = [r.score if r.score is not None else float(cast(int, r.label)) for r in rated]
    else:
        targets = [float(cast(int, r.label)) for r in rated]
    return [r.prompt for r in rated], [r.response for r in rated], torch.tensor(targets), 0


def prepare(cfg: RMConfig) -> tuple[Path, list[RMRow], list[RMRow]]:
    """Everything that can fail on bad input, done before any cluster resource is claimed."""
    try:
        backbone = resolve_backbone(cfg.model, cfg.cache_dir)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise ConfigError(f"model: {e}") from e
    try:
        train_rows, eval_rows = load_rm_data(
            cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed
        )
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    loss = cfg.loss.name
    if not is_pairs(train_rows):
        if loss in PAIRWISE:
            raise ConfigError(f"loss.name={loss} needs preference pairs, but data.train holds rated samples")
        if loss != "mse" and any(r.label is None for r in cast(list[RatedSample], train_rows)):
            raise ConfigError(f"loss.name={loss} needs a 'label' (0 or 1) on every row of data.train")
    check_data_fills_a_step(len(train_rows), cfg.trainer, "rows")
    return backbone, train_rows, eval_rows


def train_rm(cfg: RMConfig) -> RMResult:
    backbone, train_rows, eval_rows = prepare(cfg)
    # the name travels, not the driver's path: each worker resolves it on its own node
    inputs = {"backbone": cfg.model, "cache_dir": cfg.cache_dir, "train": train_rows, "eval": eval_rows}
    output_dir, final_dir, result = run_job(cfg, rm_loop, inputs, "reward model")
    return RMResult(output_dir, final_dir, result["before"], result["after"])


# --- inside each Ray Train worker --------------------------------------------------------------


def rm_loop(config: dict[str, Any]) -> None:
    cfg, train_rows, eval_rows = config["cfg"], config["train"], config["eval"]
    worker = Worker(cfg["trainer"], cfg["seed"], config["output_dir"])
    backbone = resolve_here("model", lambda: resolve_backbone(config["backbone"], config["cache_dir"]))
    model = RewardModel.from_backbone(backbone, cfg["max_length"])
    engine = worker.engine_for(model)
    loss_cfg = cfg["loss"]
    triplet = loss_cfg["name"] == "triplet"

    def micro_step(indices: list[int]) -> float:
        prompts, responses, targets, n_pairs = rm_inputs([train_rows[i] for i in indices], loss_cfg["name"])
        rewards, embeddings = engine(to_device(model.tokenize(prompts, responses), worker.device), with_embeddings=triplet)
        anchors = None
        if triplet:
            anchors = engine(to_device(model.tokenize(prompts[:n_pairs]), worker.device), with_embeddings=True)[1]
        loss = objective(loss_cfg["name"], loss_cfg, rewards, targets.to(worker.device), n_pairs, embeddings, anchors)
        engine.backward(loss)
        engine.step()
        return loss.item()

    worker.run(
        len(train_rows), cfg["seed"], micro_step,
        evaluate=lambda: held_out_metrics(worker, engine, model, eval_rows, cfg["score_batch_size"]),
        save_final=lambda after, folder: model.save(folder, {"loss": loss_cfg["name"], "held_out": after}),
    )


def held_out_metrics(
    worker: Worker, engine: DeepSpeedEngine, model: RewardModel, rows: list[RMRow], batch_size: int
) -> dict[str, float]:
    """Pairs: pairwise accuracy, mean margin r_c - r_r, and accuracy per rejection kind.
    Rated samples: MSE to the scores and accuracy of sign(r) against the labels, where given."""
    pairs = is_pairs(rows)
    kinds = sorted({r.kind for r in cast(list[PreferencePair], rows) if r.kind is not None}) if pairs else []

    def sums(batch_rows: list[RMRow]) -> list[float]:
        prompts, responses, _, n = rm_inputs(batch_rows, "mse")
        rewards = engine(to_device(model.tokenize(prompts, responses), worker.device))[0].float().cpu()
        if pairs:
            right = (rewards[:n] > rewards[n:]).float()
            per_kind = []
            for kind in kinds:
                mine = [i for i, r in enumerate(cast(list[PreferencePair], batch_rows)) if r.kind == kind]
                per_kind += [float(right[mine].sum()), float(len(mine))]
            return [float(right.sum()), float(n), float((rewards[:n] - rewards[n:]).sum()), *per_kind]
        rated = cast(list[RatedSample], batch_rows)
        scored = [(float(rw), r.score) for rw, r in zip(rewards, rated) if r.score is not None]
        labelled = [(float(rw), r.label) for rw, r in zip(rewards, rated) if r.label is not None]
        return [
            sum((rw - s) ** 2 for rw, s in scored), float(len(scored)),
            sum(float((rw > 0) == bool(lb)) for rw, lb in labelled), float(len(labelled)),
        ]

    totals = worker.sharded_sums(rows, max(1, batch_size // 2) if pairs else batch_size, sums)
    if pairs:
        out = {"eval/pairwise_accuracy": totals[0] / totals[1], "eval/margin": totals[2] / totals[1]}
        for k, kind in enumerate(kinds):
            out[f"eval/accuracy_{kind}"] = totals[3 + 2 * k] / max(totals[4 + 2 * k], 1.0)
        return out
    out = {}
    if totals[1]:
        out["eval/mse"] = totals[0] / totals[1]
    if totals[3]:
        out["eval/accuracy"] = totals[2] / totals[3]
    return out
