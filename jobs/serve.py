"""`rayrlhf serve`: a policy behind an OpenAI-compatible HTTP endpoint on Ray Serve.

This module builds the application of the model server (jobs/serve_server.py) and runs it: the
checks that need no Ray, the deployment's options, `serve run` / `serve deploy`'s app_builder, and
the verb's driver. A versioned endpoint (several checkpoints behind one route) is
jobs/serve_router.py's deploy_versioned, run by the same driver.

Serve's proxy holds at most max_queued_requests beyond the replicas' max_ongoing_requests and
answers the rest 503 with Retry-After. The API key is read where the app is built and travels as an
init argument.
"""

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import ray
from pydantic import SecretStr
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from transformers import AutoConfig

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.actors.serving.text_generator import context_length
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.cluster.storage import Storage, is_uri
from rayrlhf.jobs.config.base import ConfigError, validate
from rayrlhf.jobs.config.serve import ServeConfig, VersionConfig
from rayrlhf.jobs.serve_feedback import start_state
from rayrlhf.jobs.serve_server import STALL_GRACE_S, OpenAIServer

logger = logging.getLogger("ray.serve")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to anything
        return False


def api_key(cfg: ServeConfig) -> SecretStr | None:
    """The bearer token from the environment where the app is built (not the replicas'): it travels
    to them as an init argument, masked in any repr, and is never logged."""
    key = os.environ.get(cfg.auth_env) if cfg.auth_env else None
    return SecretStr(key) if key else None


def check_open_host(cfg: ServeConfig) -> None:
    """No endpoint reachable from the network without a key, unless allow_open_host says so."""
    if is_loopback(cfg.host) or cfg.allow_open_host:
        return
    if api_key(cfg) is None:
        where = f"${cfg.auth_env} is not set" if cfg.auth_env else "auth_env is null"
        raise ConfigError(
            f"host={cfg.host} is reachable from the network and no API key is set ({where}): set the key, "
            "or set allow_open_host: true to serve without one"
        )


def with_replica_cpus(cfg: ServeConfig) -> ServeConfig:
    """cfg with num_cpus decided: as given, or on a Ray of one node (a local machine, where Serve's own
    actors reserve no CPU) that node's CPUs shared by cfg.replicas; on a larger cluster, or before
    Ray is up (`serve run` of an import path builds the app first), 1."""
    if cfg.num_cpus is not None:
        return cfg
    nodes = [node for node in ray.nodes() if node["Alive"]] if ray.is_initialized() else []
    cpus = nodes[0]["Resources"].get("CPU", 1.0) / cfg.replicas if len(nodes) == 1 else 1.0
    return cfg.model_copy(update={"num_cpus": cpus})


def deployment_options(cfg: ServeConfig) -> dict:
    options: dict = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests or -1,
        "backpressure_config": BackpressureConfig(retry_after_s=cfg.retry_after_s),
        "health_check_period_s": cfg.health_check_period_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(cfg: ServeConfig) -> serve.Application:
    cfg = with_replica_cpus(cfg)
    options = deployment_options(cfg)
    key = api_key(cfg)
    if cfg.auth_env and key is None:
        logger.warning("auth is off: $%s is not set where the app is built", cfg.auth_env)
    # @serve.deployment made the class a Deployment; Serve's types still call it the class
    return OpenAIServer.options(**options).bind(cfg.model_dump(), key)  # type: ignore[attr-defined]


def version_app(cfg: ServeConfig, version: VersionConfig) -> serve.Application:
    """One version of a versioned endpoint: the model server for version.model, answering to
    version.name, reached only through the router (no HTTP route, so no key of its own). Deleting
    it (a rollback) lets its replicas finish what they hold, up to the longest a request may take."""
    single = with_replica_cpus(cfg).model_copy(
        update={"model": version.model, "served_model_name": version.name, "versions": [], "traffic": {}}
    )
    options = {**deployment_options(cfg), "graceful_shutdown_timeout_s": cfg.request_timeout_s + STALL_GRACE_S + 1}
    return OpenAIServer.options(**options).bind(single.model_dump(), None, cfg.app_name)  # type: ignore[attr-defined]


def _absolute_path(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _absolute_model(cfg: ServeConfig) -> ServeConfig:
    """Checkpoint paths made absolute, so replicas find them whatever their working directory."""
    versions = [v.model_copy(update={"model": _absolute_path(v.model)}) for v in cfg.versions]
    update: dict = {"versions": versions}
    if not cfg.versions and _absolute_path(cfg.model) != cfg.model:
        update.update(model=_absolute_path(cfg.model), served_model_name=cfg.model_name)
    return cfg.model_copy(update=update)


def app_builder(args: dict) -> serve.Application:
    """For `serve run` / `serve deploy`: import_path rayrlhf.jobs.serve:app_builder, args a ServeConfig."""
    cfg = validate(ServeConfig, dict(args), "serve application args")
    if cfg.versions:
        raise ConfigError("versions: a versioned endpoint is several Serve applications and a state actor; "
                          "start it with `rayrlhf serve` (docs/serving_versions.md)")
    return build_app(feedback_storage(_absolute_model(cfg)))


def prepare(cfg: ServeConfig, local: bool) -> ServeConfig:
    """Checks that need no Ray: an open host has a key, the model resolves (built-ins are converted
    once), the port is free."""
    check_open_host(cfg)
    cfg = feedback_storage(_absolute_model(cfg))
    if local:
        for field, model in ([(f"versions.{v.name}.model", v.model) for v in cfg.versions] or [("model", cfg.model)]):
            try:
                context = context_length(AutoConfig.from_pretrained(resolve_policy(model, cfg.cache_dir)))
            except (ValueError, OSError, ModuleNotFoundError) as e:
                raise ConfigError(f"{field}: {e}") from e
            if cfg.max_tokens + (cfg.max_prompt_tokens or 1) > context:
                raise ConfigError(
                    f"max_tokens ({cfg.max_tokens}) + max_prompt_tokens ({cfg.max_prompt_tokens}) exceed the "
                    f"context length of {model} ({context})"
                )
        with socket.socket() as s:
            try:
                s.bind((cfg.host, cfg.port))
            except OSError as e:
                raise ConfigError(f"port: cannot listen on {cfg.host}:{cfg.port}: {e}") from e
    if not is_loopback(cfg.host):
        logger.warning("host=%s: the endpoint is reachable from the network", cfg.host)
    return cfg


def feedback_storage(cfg: ServeConfig) -> ServeConfig:
    """Feedback files are appended to: a path (made absolute here, on the driver) or file://."""
    location = cfg.feedback.output_dir
    if is_uri(location) and not location.startswith("file://"):
        raise ConfigError(f"feedback.output_dir: {location!r} cannot be appended to; give a path, a shared "
                          "filesystem path or a file:// URI")
    return cfg.model_copy(update={"feedback": cfg.feedback.model_copy(update={"output_dir": Storage(location).location})})


def deploy_single(cfg: ServeConfig) -> DeploymentHandle:
    """The endpoint's state actor (a fresh one: the feedback window starts empty), then the app."""
    start_state(cfg)
    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)


def start(cfg: ServeConfig, deploy: Callable[[ServeConfig], DeploymentHandle] = deploy_single) -> DeploymentHandle:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app (Ray must be up); a versioned
    endpoint passes jobs/serve_router.py's deploy_versioned."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return deploy(cfg)


def run(cfg: ServeConfig, address: str | None = None,
        deploy: Callable[[ServeConfig], DeploymentHandle] = deploy_single) -> None:
    """Local Ray: serve until Ctrl-C, then shut down. A given cluster keeps the app running."""
    address = address or os.environ.get("RAY_ADDRESS")
    cfg = prepare(cfg, local=address is None)
    init_ray(address)
    try:
        start(cfg, deploy)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        names = f"{cfg.model_name!r} (versions {', '.join(v.name for v in cfg.versions)})" if cfg.versions else repr(cfg.model_name)
        print(f"serving {names} at http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1", flush=True)
        if address is None:
            print("Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:
            serve.shutdown()
            shutdown_ray()  # with it the state actor of a versioned endpoint
