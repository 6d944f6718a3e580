"""The `rayrlhf tune` schema: which run config to tune, the search space, the objective.

A tune file names a base run config (a name in ray_configs/ or a path) and says what differs:
`overrides` (kept in the exported best config), `trial` (each trial's small budget: steps, eval
set; not exported) and the points of the search space. Every trial's run config is a `RunConfig`,
validated here at each corner of the space before Ray starts, so a bad field fails early.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayrlhf.jobs.config.base import (
    ConfigError,
    StrictModel,
    load_yaml,
    merge,
    parse_overrides,
    resolve_config_path,
    validate,
)
from rayrlhf.jobs.config.run import RunConfig, function_name
from rayrlhf.jobs.run import pbt

CIRCULAR_METRICS = {"eval/raw", "eval/total"}
"""The tuned reward itself: its scale moves with the weights, so it cannot rank them."""


class ParamSpec(StrictModel):
    """One dimension: a list of `values` (grid or choice), or a `low`..`high` range (uniform or log)."""

    values: list[float] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either values or low/high, not both")
        elif self.low is None or self.high is None:
            raise ValueError("give values, or both low and high")
        elif not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        return self

    def bounds(self) -> list[float]:
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None  # _one_kind
        return [self.low, self.high]


class SimplexSpec(StrictModel):
    """Weights that only matter by their ratio, searched on the simplex (they sum to 1).

    Stick-breaking: k weights come from k-1 shares s_i in [0, 1]; w_1 = s_1, w_2 = (1 - s_1) s_2,
    ..., w_k = what is left. With two weights: alpha = s, beta = 1 - s.
    """

    weights: list[str] = Field(["reward.alpha", "reward.beta"], min_length=2)
    share: ParamSpec = ParamSpec(low=0.0, high=1.0)

    @model_validator(mode="after")
    def _shares_in_unit(self) -> SimplexSpec:
        if any(not 0.0 <= b <= 1.0 for b in self.share.bounds()):
            raise ValueError(f"share must lie in [0, 1], got {self.share.bounds()}")
        return self

    def share_names(self) -> list[str]:
        return [f"simplex_share_{i}" for i in range(1, len(self.weights))]

    def weights_from(self, point: dict[str, float]) -> dict[str, float]:
        left, out = 1.0, {}
        for name, share in zip(self.weights, (point[s] for s in self.share_names())):
            out[name] = round(left * share, 12)  # 0.2, not 0.19999999999999996, in tables and exports
            left -= out[name]
        out[self.weights[-1]] = round(left, 12)
        return out


class PBTConfig(StrictModel):
    """Population-based training (search.algorithm=pbt): every `interval` steps the weakest trials take
    over a strong trial's run checkpoint and continue with its settings, perturbed (docs/tuning_pbt.md)."""

    interval: int = Field(2, ge=1)
    """Steps between perturbations; each trial is evaluated and checkpointed at these steps."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """The bottom fraction of trials takes over from the top fraction (at least one each)."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """Chance that a perturbed value is drawn afresh from its range instead of multiplied by 0.8 or 1.2."""
    synch: bool = True
    """Wait for every trial at each interval (all take part in every exploit; each trial is paused and
    resumed from its checkpoint there); false: a trial perturbs when it arrives, against the others' last scores."""


class SearchConfig(StrictModel):
    algorithm: Literal["grid", "random", "optuna", "pbt"] = "random"
    space: dict[str, ParamSpec] = {}
    """Independent dimensions: a dotted run-config field (reward.alpha, learner.lr, ...) -> its range.
    A user reward function's weight is reward.functions.<its name>.weight."""
    simplex: SimplexSpec | None = None
    num_samples: int | None = Field(None, ge=1)
    """random/optuna: trials drawn (None: 8); grid: times the whole grid is repeated (None: once)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Cap on trials at once; None: as many as the cluster's resources hold."""
    seed: int = 0
    pbt: PBTConfig = PBTConfig()
    """Used when algorithm=pbt: num_samples is then the population (the initial points, drawn at random)."""

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, space: Any) -> Any:
        """`reward: {alpha: {...}}` (as --set search.space.reward.alpha=... writes it) -> `reward.alpha: {...}`."""
        if not isinstance(space, dict):
            return space
        flat = {}
        for key, value in space.items():
            if isinstance(value, dict) and value and not set(value) & set(ParamSpec.model_fields):
                flat.update({f"{key}.{k}": v for k, v in cls._flatten(value).items()})
            else:
                flat[key] = value
        return flat

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if not self.space and self.simplex is None:
            raise ValueError("the search space is empty: give space and/or simplex")
        if self.simplex is not None:
            both = set(self.simplex.weights) & set(self.space)
            if both:
                raise ValueError(f"{sorted(both)} are both in space and in simplex.weights")
        if self.algorithm == "grid":
            ranged = [name for name, spec in self.dimensions().items() if spec.values is None]
            if ranged:
                raise ValueError(f"algorithm=grid needs values for every dimension, {ranged} give low/high")
        if self.algorithm == "pbt":
            bounds = {name: spec.bounds() for name, spec in self.space.items()}
            if self.simplex is not None:
                bounds |= {name: [0.0, 1.0] for name in self.simplex.weights}
            pbt.check_space(bounds)
            if self.samples() < 2:
                raise ValueError("algorithm=pbt needs a population: num_samples >= 2")
        return self

    def samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return 1 if self.algorithm == "grid" else 8

    def dimensions(self) -> dict[str, ParamSpec]:
        """Tune's parameter names -> their specs (simplex shares included)."""
        dims = dict(self.space)
        if self.simplex is not None:
            dims.update({name: self.simplex.share for name in self.simplex.share_names()})
        return dims

    def field_values(self, point: dict[str, float]) -> dict[str, float]:
        """A point of the search space as run-config fields, e.g. {"reward.alpha": 0.3, ...}."""
        out = {name: point[name] for name in self.space}
        if self.simplex is not None:
            out.update(self.simplex.weights_from(point))
        return out

    def weight_fields(self) -> list[str]:
        """The run-config fields a point sets (the simplex weights, then the independent dimensions)."""
        return [*(self.simplex.weights if self.simplex else []), *self.space]


class ASHAConfig(StrictModel):
    enabled: bool = True
    grace_period: int = Field(1, ge=1)
    """Held-out evaluations a trial gets before it may be stopped."""
    reduction_factor: float = Field(2.0, gt=1)


class ObjectiveConfig(StrictModel):
    metric: str = "eval/rouge_l"
    """A held-out metric of jobs/train.py evaluate(): eval/rouge_l, eval/sim, eval/<component>, ..."""
    mode: Literal["max", "min"] = "max"
    kl_budget: float | None = Field(None, gt=0)
    """Trials whose final KL to the reference exceeds this get the worst objective (needs the KL term on)."""

    @model_validator(mode="after")
    def _held_out(self) -> ObjectiveConfig:
        if not self.metric.startswith("eval/"):
            raise ValueError(f"metric must be a held-out eval/ metric, got {self.metric!r}")
        if self.metric in CIRCULAR_METRICS:
            raise ValueError(f"{self.metric} is the tuned reward itself; tune on a held-out metric such as eval/rouge_l")
        return self


class TuneConfig(StrictModel):
    name: str = "tune"
    """The experiment's folder under storage_path; an existing one is resumed."""
    base: str = "default"
    """The run config to tune: a name in ray_configs/ or a path."""
    overrides: dict[str, Any] = {}
    """Run-config fields changed for every trial and kept in the exported best config."""
    trial: dict[str, Any] = {}
    """Each trial's budget (steps, eval_every, data.num_eval, ...): not in the exported config."""
    trial_cpus: float = Field(0.25, gt=0)
    """CPU reserved for each trial's driver (bundle 0 of its placement group)."""
    search: SearchConfig = SearchConfig(simplex=SimplexSpec())
    asha: ASHAConfig = ASHAConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    max_failures: int = Field(1, ge=0)
    """Retries of a failed trial; a trial that still fails is reported and the search goes on."""
    storage_path: str = "outputs/tune"
    """Where results go: a path (relative to the working directory; never the home directory by default)
    or a pyarrow.fs URI (`s3://bucket/tune`, `file:///shared/tune`), as Ray Tune's storage_path."""

    @model_validator(mode="after")
    def _pbt_on_a_path(self) -> TuneConfig:
        if self.search.algorithm == "pbt" and "://" in self.storage_path:
            raise ValueError("search.algorithm=pbt needs storage_path to be a path (a shared filesystem on a "
                             "cluster): its exploits hand run checkpoints between trials through Tune")
        return self

    def storage_location(self) -> str:
        """storage_path as Tune gets it: a URI as written, a path made absolute here."""
        if "://" in self.storage_path:  # a URI (no pyarrow here: the CLI validates without it)
            return self.storage_path.rstrip("/")
        return str(Path(self.storage_path).expanduser().resolve())

    def experiment_dir(self) -> str:
        """The experiment's folder, storage_path/name: an absolute path or a URI."""
        return f"{self.storage_location()}/{self.name}"


def set_field(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """set_dotted that also enters lists of named entries by name: `reward.functions.exact_match.weight`
    is the weight of the reward function named exact_match (by `name`, else by its function's name)."""
    node: Any = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        if isinstance(node, list):
            names = [e.get("name") or function_name(str(e.get("path", ""))) for e in node if isinstance(e, dict)]
            if key not in names:
                raise ConfigError(f"search field {dotted}: no entry named {key!r} (entries: {names})")
            node = node[names.index(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"search field {dotted}: {key} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"search field {dotted}: name an entry of the list, e.g. {dotted}.<name>.weight")
    node[leaf] = value


class TuneSetup:
    """A validated tune config with its base run config, able to build any trial's run config."""

    def __init__(self, tune_cfg: TuneConfig, source: str) -> None:
        self.cfg = tune_cfg
        self.source = source
        self.base_path = resolve_config_path(tune_cfg.base)
        self.base_data = merge(load_yaml(self.base_path), tune_cfg.overrides)

    def export_data(self, fields: dict[str, float]) -> dict[str, Any]:
        """The ready-to-run config of a point: base + overrides + the point's fields (no trial budget)."""
        data = copy.deepcopy(self.base_data)
        for dotted, value in fields.items():
            set_field(data, dotted, value)
        return data

    def run_config(self, fields: dict[str, float], **extra: Any) -> RunConfig:
        data = merge(merge(self.export_data(fields), self.cfg.trial), extra)
        if self.cfg.search.algorithm == "pbt":  # PBT ranks (and checkpoints) the trials at every interval
            data["eval_every"] = self.cfg.search.pbt.interval
        where = f"{self.source} (base {self.base_path.name}, point {fields})"
        return validate(RunConfig, data, where)

    def check(self) -> RunConfig:
        """Validate the run config at every corner of the space; returns the first one."""
        dims = self.cfg.search.dimensions()
        corners = itertools.product(*(spec.bounds() for spec in dims.values()))
        first = None
        for corner in corners:
            cfg = self.run_config(self.cfg.search.field_values(dict(zip(dims, corner))))
            first = first or cfg
            if self.cfg.objective.kl_budget is not None and not (cfg.kl.coef > 0 or cfg.kl.adaptive):
                raise ConfigError(f"{self.source}: objective.kl_budget needs the KL term on (kl.coef > 0 or kl.adaptive)")
            if self.cfg.search.algorithm == "pbt" and cfg.steps <= cfg.eval_every:
                raise ConfigError(f"{self.source}: a PBT trial of {cfg.steps} steps is never perturbed "
                                  f"(search.pbt.interval={cfg.eval_every}): give trial.steps > interval")
        validate(RunConfig, self.base_data, f"{self.source} (base {self.base_path.name} + overrides)")
        assert first is not None  # product() yields at least one corner, the empty one without dimensions
        return first


def load_tune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TuneSetup:
    cfg_path = resolve_config_path(path, default="tune.yaml")
    data = merge(load_yaml(cfg_path), parse_overrides(overrides or []))
    setup = TuneSetup(validate(TuneConfig, data, str(cfg_path)), str(cfg_path))
    setup.check()
    return setup
