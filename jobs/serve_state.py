"""A versioned endpoint's state actor: its versions, their traffic shares and request counts.

The endpoint's FeedbackStore (jobs/serve_feedback.py) with what every router replica must agree on
and no replica's memory may own: the versions and their traffic shares (routers re-read them every
routing_refresh_s) and per-version request counts and latencies. It also deploys and deletes the
versions' Serve applications, so a rollout or rollback is one call from the admin endpoint.
Threaded (max_concurrency): recording answers goes on while a rollout waits for its replicas.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from ray import serve

from rayrlhf.actors.serving.openai_schema import OpenAIError
from rayrlhf.actors.serving.versions import NAME_PATTERN, resolve_shares
from rayrlhf.jobs.config.serve import ServeConfig, VersionConfig
from rayrlhf.jobs.serve_feedback import FeedbackStore

LATENCY_WINDOW = 1000
"""Latencies kept per version for the percentiles in /stats."""


def version_app_name(cfg: ServeConfig, version: str) -> str:
    return f"{cfg.app_name}--{version}"


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


class ServingState(FeedbackStore):
    """A versioned endpoint's state: its feedback, versions, shares and per-version counts."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.models = {v.name: v.model for v in self.cfg.versions}
        self.explicit = dict(self.cfg.traffic)
        self.shares = resolve_shares(list(self.models), self.explicit)
        self.epoch = 0
        self.stats = {name: VersionStats() for name in self.models}

    def table(self) -> dict[str, Any]:
        """The routing table: epoch (changes with every change), shares and models by version."""
        with self.lock:
            return {"epoch": self.epoch, "shares": dict(self.shares), "models": dict(self.models)}

    def served(self, version: str, latency_s: float, outcome: str) -> None:
        with self.lock:
            stats = self.stats.setdefault(version, VersionStats())
            stats.outcomes[outcome] += 1
            if outcome == "ok":
                stats.latencies.append(latency_s)

    def report(self) -> dict[str, Any]:
        with self.lock:
            versions = {name: {"traffic": self.shares.get(name, 0.0), "model": self.models.get(name),
                               **stats.as_dict()} for name, stats in self.stats.items()}
        return {"versions": versions, **super().report()}

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
