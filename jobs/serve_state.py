"""The shared state of a versioned endpoint: one detached Ray actor per Serve application.

It holds what every router replica must agree on and no replica's memory may own: the versions and
their traffic shares (routers re-read them every routing_refresh_s), the window of served answers
that feedback refers to (any router replica may serve the answer, another one take its rating),
the feedback files, and per-version request counts and latencies. It also deploys and deletes the
versions' Serve applications, so a rollout or rollback is one call from the admin endpoint.
Threaded (max_concurrency): recording answers goes on while a rollout waits for its replicas.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray
from ray import serve

from rayrlhf.actors.serving.feedback import FeedbackBook, Served, parse_feedback
from rayrlhf.actors.serving.openai_schema import OpenAIError
from rayrlhf.actors.serving.versions import NAME_PATTERN, resolve_shares
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.serve import ServeConfig, VersionConfig

NAMESPACE = "rayrlhf"
LATENCY_WINDOW = 1000
"""Latencies kept per version for the percentiles in /stats."""
RATINGS_FILE, PAIRS_FILE = "ratings.jsonl", "preferences.jsonl"


def state_name(cfg: ServeConfig) -> str:
    return f"serving-state-{cfg.app_name}"


def version_app_name(cfg: ServeConfig, version: str) -> str:
    return f"{cfg.app_name}--{version}"


def append_rows(storage: Storage, name: str, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines to a file of the storage (created if missing)."""
    if not rows:
        return
    path = f"{storage.root}/{name}"
    storage.filesystem.create_dir(storage.root, recursive=True)
    with storage.filesystem.open_append_stream(path) as out:
        out.write("".join(json.dumps(r) + "\n" for r in rows).encode())


class VersionStats:
    def __init__(self) -> None:
        self.outcomes = {"ok": 0, "refused": 0, "failed": 0}
        """ok, refused (4xx: the client's fault) or failed (5xx, or a stream cut short)."""
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
        return {"requests": sum(self.outcomes.values()), **self.outcomes,
                "latency_mean_s": statistics.fmean(lat) if lat else None,
                "latency_p50_s": pick(0.5), "latency_p95_s": pick(0.95)}


class ServingState:
    def __init__(self, config: dict) -> None:
        self.cfg = cfg = ServeConfig.model_validate(config)
        self.lock = threading.Lock()
        self.models = {v.name: v.model for v in cfg.versions}
        self.explicit = dict(cfg.traffic)
        self.shares = resolve_shares(list(self.models), self.explicit)
        self.epoch = 0
        self.stats = {name: VersionStats() for name in self.models}
        self.book = FeedbackBook(cfg.feedback.max_records, cfg.feedback.max_age_s)
        self.storage = Storage(cfg.feedback.output_dir)
        self.counts = {"ratings": 0, "pairs": 0}

    def table(self) -> dict[str, Any]:
        """The routing table: epoch (changes with every change), shares and models by version."""
        with self.lock:
            return {"epoch": self.epoch, "shares": dict(self.shares), "models": dict(self.models)}

    def served(self, version: str, latency_s: float, outcome: str, answer: Served | None) -> None:
        with self.lock:
            stats = self.stats.setdefault(version, VersionStats())
            stats.outcomes[outcome] += 1
            if outcome == "ok":
                stats.latencies.append(latency_s)
            if answer is not None:
                self.book.record(answer)

    def feedback(self, body: bytes) -> tuple:
        """("ok", result) or ("error", status, OpenAI error body)."""
        try:
            request = parse_feedback(body)
            with self.lock:
                ratings, pairs = self.book.feedback(request)
                append_rows(self.storage, RATINGS_FILE, ratings)
                append_rows(self.storage, PAIRS_FILE, pairs)
                self.counts["ratings"] += len(ratings)
                self.counts["pairs"] += len(pairs)
        except OpenAIError as err:
            return "error", err.status, err.body()
        return "ok", {"object": "feedback", "ratings": len(ratings), "pairs": len(pairs)}

    def report(self) -> dict[str, Any]:
        with self.lock:
            versions = {name: {"traffic": self.shares.get(name, 0.0), "model": self.models.get(name),
                               **stats.as_dict()} for name, stats in self.stats.items()}
            return {"versions": versions, "feedback": {"kept": len(self.book), **self.counts,
                                                       "output_dir": self.storage.location}}

    # --- rollout and rollback ---------------------------------------------------------------

    def set_traffic(self, explicit: dict[str, float]) -> tuple:
        """Change some versions' shares (the others keep theirs or split the rest)."""
        with self.lock:
            merged = {**self.explicit, **explicit}
            try:
                shares = resolve_shares(list(self.models), merged)
            except ValueError as e:
                return "error", 400, OpenAIError(400, str(e), "traffic").body()
            self.explicit, self.shares = merged, shares
            self.epoch += 1
        return "ok", self.table()

    def rollout(self, name: str, model: str, traffic: float | None) -> tuple:
        """Deploy a new version's application (waits until its replicas run), then route to it."""
        from rayrlhf.jobs.serve import version_app  # torch and transformers: only when deploying

        if not NAME_PATTERN.match(name):
            return "error", 400, OpenAIError(400, f"version name {name!r}: use letters, digits and . _ : -", "name").body()
        if "/" in model and not Path(model).is_absolute():
            return "error", 400, OpenAIError(400, f"model {model!r}: give an absolute checkpoint path", "model").body()
        share = {} if traffic is None else {name: traffic}
        with self.lock:
            if name in self.models:
                return "error", 409, OpenAIError(409, f"version {name!r} is already served", "name").body()
            try:
                resolve_shares([*self.models, name], {**self.explicit, **share})
            except ValueError as e:
                return "error", 400, OpenAIError(400, str(e), "traffic").body()
        app = version_app_name(self.cfg, name)
        try:
            serve.run(version_app(self.cfg, VersionConfig(name=name, model=model)), name=app, route_prefix=None)
        except Exception as e:  # the replica could not load the model: nothing routes to it yet
            serve.delete(app)
            return "error", 400, OpenAIError(400, f"model {model!r} could not be deployed: {e}", "model").body()
        with self.lock:
            self.models[name] = model
            self.explicit = {**self.explicit, **share}
            self.shares = resolve_shares(list(self.models), self.explicit)
            self.stats.setdefault(name, VersionStats())
            self.epoch += 1
        return "ok", self.table()

    def rollback(self, name: str) -> tuple:
        """Stop routing to a version, wait until every router has seen that, then delete its
        application (Serve lets its replicas finish the requests they hold)."""
        with self.lock:
            if name not in self.models:
                return "error", 404, OpenAIError(404, f"no version {name!r} is served", "name", code="model_not_found").body()
            models = {v: m for v, m in self.models.items() if v != name}
            explicit = {v: s for v, s in self.explicit.items() if v != name}
            try:
                shares = resolve_shares(list(models), explicit)
            except ValueError as e:
                return "error", 409, OpenAIError(409, f"removing {name!r} would leave no traffic: {e}", "name").body()
            self.models, self.explicit, self.shares = models, explicit, shares
            self.epoch += 1
        time.sleep(2 * self.cfg.routing_refresh_s)
        serve.delete(version_app_name(self.cfg, name))
        return "ok", self.table()


def stop_state(cfg: ServeConfig) -> None:
    """Kill the endpoint's state actor, if one runs, and wait until its name is free."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.kill(ray.get_actor(state_name(cfg), namespace=NAMESPACE))
        except ValueError:  # none (any more)
            return
        time.sleep(0.2)


def start_state(cfg: ServeConfig) -> ray.actor.ActorHandle:
    """The endpoint's state actor (a fresh one), detached so it outlives the driver of a cluster
    deployment."""
    stop_state(cfg)
    actor: Any = ray.remote(ServingState).options(
        name=state_name(cfg), namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=16,
    ).remote(cfg.model_dump())
    ray.get(actor.table.remote())
    return actor
