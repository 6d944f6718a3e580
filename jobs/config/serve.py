"""The schema of `rayrlhf serve`: the one home of the server's defaults.

ray_configs/serve.yaml is a Ray Serve config file, so `serve run` / `serve deploy` take it as it
is: `http_options` say where Serve listens and the application's `args` are a ServeConfig. The
same file feeds `rayrlhf serve`, which reads host and port from `http_options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayrlhf.actors.serving.versions import NAME_PATTERN, resolve_shares

from rayrlhf.jobs.config.base import (
    ConfigError,
    StrictModel,
    load_yaml,
    merge,
    parse_overrides,
    resolve_config_path,
    validate,
)

IMPORT_PATH = "rayrlhf.jobs.serve:app_builder"


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling on ongoing requests per replica (replaces num_replicas when set)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class VersionConfig(StrictModel):
    """One policy version behind a versioned endpoint (docs/serving_versions.md)."""

    name: str
    """What clients send as `model` to pin this version; letters, digits and . _ : - ."""
    model: str
    """A built-in name or a checkpoint directory, as ServeConfig.model."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"version name {value!r}: use letters, digits and . _ : - (at most 128); "
                             "--model NAME=MODEL names a version")
        return value


class FeedbackConfig(StrictModel):
    """POST /v1/feedback on a versioned endpoint: where ratings and preference pairs go, and how
    long served answers are kept to be rated."""

    output_dir: str = "outputs/feedback"
    """A path (relative: to the working directory of `rayrlhf serve`) or a file:// URI: the files
    ratings.jsonl and preferences.jsonl are appended to (object stores cannot append)."""
    max_records: int = Field(10_000, ge=1)
    """Served responses kept for feedback (the oldest leave first)."""
    max_age_s: float = Field(3600.0, gt=0)
    """A response older than this can no longer be rated (410)."""


class ServeConfig(StrictModel):
    model: str = "smollm2-135m-instruct"
    """A built-in name (smollm2-135m-instruct, tiny-gpt2) or a checkpoint directory (e.g. outputs/x/final)."""
    served_model_name: str | None = None
    """The `model` clients send; default: the built-in name or the checkpoint path as given."""
    cache_dir: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on a GPU replica, float32 on a CPU one."""
    host: str = "127.0.0.1"
    """Where `rayrlhf serve` binds (serve.yaml: http_options.host). Anything else exposes the model."""
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "rayrlhf"
    """host, port, route_prefix and app_name say where the app runs: `rayrlhf serve` uses them,
    the application builder ignores them (Serve takes them from the config file)."""
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float | None = Field(None, gt=0)
    """CPUs reserved per replica; default: on a Ray of one node (a local machine) that node's CPUs
    shared evenly by the replicas the config can start (num_replicas or autoscaling.max_replicas,
    times the versions), so one replica uses every core; on a cluster of several nodes, 1."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved per replica (fractions share one GPU between replicas); > 0 puts the model on it."""
    torch_threads: int | None = Field(None, ge=1)
    """Per replica; default: the CPUs it reserves (num_cpus, at least 1). More threads than reserved
    cores thrash when the node is busy (decoding many times slower under load: benchmarks/README.md)."""
    max_batch_size: int = Field(8, ge=1)
    """Sequences (prompts x n) in flight at once: a request joins the running decode batch at the
    next step when its rows fit, and a finished row frees its slot at once; 1 turns batching off."""
    join_wait_steps: int = Field(4, ge=0)
    """While rows are decoding, new requests that do not fill the free rows wait up to this many decode
    steps to be prefilled together: one prefill forward costs about as much for 1 as for 4 short
    prompts, and every running row waits for it. 0 prefills each step's arrivals at the next step."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica accepts at once (the ones that do not fit in the batch wait for rows)."""
    default_max_tokens: int = Field(16, ge=1)
    """max_tokens when a request gives none (OpenAI's completions default)."""
    max_tokens: int = Field(256, ge=1)
    """Upper limit of a request's max_tokens."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest prompt accepted; default: the model's context length minus max_tokens."""
    request_timeout_s: float = Field(60.0, gt=0)
    """A request that has not finished by then gets 504 and leaves the batch."""
    auth_env: str | None = "RAYRLHF_API_KEY"
    """Environment variable holding the bearer token, read where the app is built (the driver of
    `rayrlhf serve`, or wherever Serve runs the app builder) and handed to the replicas with the
    deployment; auth is on when it is set. None turns auth off."""
    allow_open_host: bool = False
    """Serve on a host other than loopback without an API key (auth_env unset or empty): refused unless true."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body read (bytes); a larger one gets 413 before it is parsed or tokenised."""
    max_queued_requests: int | None = Field(64, ge=1)
    """Requests each Serve proxy holds back when every replica has max_ongoing_requests; beyond them
    a request gets 503 with Retry-After at once. None: no bound (Serve's -1)."""
    retry_after_s: float = Field(1.0, ge=0)
    """The Retry-After of that 503."""
    health_check_period_s: float = Field(10.0, gt=0)
    """Seconds between Serve's health checks of a replica: a replica that died (killed, out of memory)
    is noticed, and a new one started, at the next check (Serve's default: 10)."""
    episodes_file: str | None = None
    """Where POST /v1/episodes appends the episodes it builds (JSONL, on the replica's node; a path
    `rayrlhf train` takes as data.episodes). None: episodes are only returned to the caller."""
    versions: list[VersionConfig] = []
    """Several policies behind one endpoint (then `model` is unused): each its own Serve application
    with the settings above, a router in front (docs/serving_versions.md). Empty: one policy, `model`."""
    traffic: dict[str, float] = {}
    """Traffic shares in [0, 1] by version name; versions not named split the rest evenly."""
    routing_refresh_s: float = Field(1.0, gt=0)
    """How often a router re-reads the versions and shares; a rollback waits twice this before it
    deletes the version's application."""
    feedback: FeedbackConfig = FeedbackConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) > max_tokens ({self.max_tokens})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "a batch could never fill"
            )
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"versions: names must be unique, got {names}")
        if self.traffic and not self.versions:
            raise ValueError("traffic needs versions (give --model twice, or a versions list)")
        if self.versions:
            try:
                resolve_shares(names, self.traffic)
            except ValueError as e:
                raise ValueError(f"traffic: {e}") from None
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/': {self.route_prefix!r}")
        return self

    @property
    def replicas(self) -> int:
        """The most replicas the config can start, every version's together."""
        return (self.autoscaling.max_replicas if self.autoscaling else self.num_replicas) * max(1, len(self.versions))

    @property
    def threads(self) -> int:
        """torch_threads, or the replica's CPU reservation (1 while num_cpus is left to the cluster)."""
        return self.torch_threads or max(1, int(self.num_cpus or 1))

    @property
    def model_name(self) -> str:
        """The `model` clients send; on a versioned endpoint the name that lets the router pick."""
        return self.served_model_name or (self.app_name if self.versions else self.model)


def _application(data: dict[str, Any], source: str) -> dict[str, Any]:
    apps = data.get("applications")
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{source}: applications: expected a list with one application")
    app = apps[0]
    if app.get("import_path") != IMPORT_PATH:
        raise ConfigError(f"{source}: applications[0].import_path: expected {IMPORT_PATH!r}")
    return app


def serve_settings(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A Serve config file's settings as one flat ServeConfig mapping (not yet validated)."""
    app = _application(data, source)
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: applications[0].args: expected a mapping")
    http = data.get("http_options") or {}
    out = dict(args)
    for key in ("host", "port"):
        if key in http:
            out[key] = http[key]
    for key, field in (("route_prefix", "route_prefix"), ("name", "app_name")):
        if key in app:
            out[field] = app[key]
    return out


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """ray_configs/serve.yaml (or a name / path), with `field=value` overrides, validated."""
    cfg_path = resolve_config_path(path, default="serve.yaml")
    settings = merge(serve_settings(load_yaml(cfg_path), str(cfg_path)), parse_overrides(overrides or []))
    return validate(ServeConfig, settings, str(cfg_path))
