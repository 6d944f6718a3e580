"""A versioned endpoint: several policy versions behind one OpenAI-compatible route, with canary
traffic shares, rollout and rollback while it serves, and feedback for the reward model.

Layout: one Serve application per version (jobs/serve_server.py's OpenAIServer for that checkpoint, no
HTTP route) and in front one router application (this module's VersionRouter, the HTTP ingress),
which calls the versions through DeploymentHandles, plus the endpoint's state actor
(jobs/serve_state.py). Why not Serve's model multiplexing: a multiplexed replica loads a model
on its first request and evicts by LRU, so a canary's first requests wait for a load, versions
share one replica's batch and resources, and an evicted model would reload under traffic; here
every version keeps its own continuous-batching replicas, sized like a single-model endpoint.
Why not one application with all the versions in it, redeployed with `serve.run` on each change:
an update of an application redeploys the deployments whose code or arguments changed, the
router among them (its arguments name the versions), which replaces its replicas under traffic.
Separate applications make a rollout `serve.run` of a new application that nothing routes to
until its replicas are up, and a rollback `serve.delete` of one that nothing routes to any more
(Serve lets the deleted replicas finish the requests they hold, up to graceful_shutdown_timeout_s,
set to the longest a request may take); the router's application is never touched.

Routing: `model` = a version's name pins it; `model` = the endpoint's name (served_model_name,
default the app name) lets the router pick by the shares with a smooth weighted round-robin
(actors/serving/versions.py), per router replica. The admin endpoint (same API key):
  POST   /admin/versions         {"name": "B", "model": "/abs/ckpt", "traffic": 0.1}   rollout
  POST   /admin/traffic          {"B": 0.5}                                              shares
  DELETE /admin/versions/{name}                                                          rollback
Feedback goes to the state actor, where every version's replicas recorded what they served; an
episode (POST /v1/episodes) goes to the version that served its requests, which recorded their tokens.
"""

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.serve import RunTarget, metrics
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rayrlhf.actors.serving.openai_requests import Kind
from rayrlhf.actors.serving.openai_schema import EpisodePost, OpenAIError, parse_request
from rayrlhf.actors.serving.versions import WeightedRoundRobin
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.serve import api_key, deployment_options, version_app
from rayrlhf.jobs.serve_feedback import NAMESPACE, start_state, state_name
from rayrlhf.jobs.serve_http import answered, authorize, internal_error, json_body, openai_app, request_id
from rayrlhf.jobs.serve_state import ServingState, version_app_name

router_app = openai_app("rayrlhf versions")  # the same error bodies as the model server

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@serve.deployment
@serve.ingress(router_app)
class VersionRouter:
    def __init__(self, config: dict, api_key: SecretStr | None = None) -> None:
        self.cfg = ServeConfig.model_validate(config)
        self.token = api_key.get_secret_value() if api_key else None
        self.state = ray.get_actor(state_name(self.cfg.app_name), namespace=NAMESPACE)
        self.table: dict[str, Any] = {"epoch": -1}
        self.fetched = 0.0
        self.picker: WeightedRoundRobin | None = None
        self.handles: dict[tuple[str, bool], DeploymentHandle] = {}
        self.requests = metrics.Counter("rayrlhf_version_requests", "requests answered, by version and outcome",
                                        tag_keys=("version", "outcome"))  # type: ignore[arg-type]  # Ray's stub says tuple[str]
        self.latency = metrics.Histogram("rayrlhf_version_latency_s", "seconds to a complete answer, by version",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("version",))

    async def _table(self) -> dict[str, Any]:
        if time.monotonic() - self.fetched > self.cfg.routing_refresh_s:
            table = await self.state.table.remote()
            if table["epoch"] != self.table["epoch"]:
                self.table, self.picker = table, WeightedRoundRobin(table["shares"])
            self.fetched = time.monotonic()
        return self.table

    async def _route(self, body: bytes) -> tuple[str, bytes]:
        """(version, body for it)."""
        table = await self._table()
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        requested = data.get("model") if isinstance(data, dict) else None
        if isinstance(requested, str) and requested in table["models"]:
            return requested, body
        if isinstance(requested, str) and requested != self.cfg.model_name:
            names = ", ".join([self.cfg.model_name, *table["models"]])
            raise OpenAIError(404, f"the model {requested!r} does not exist; this server serves {names}",
                              param="model", code="model_not_found")
        assert self.picker is not None  # set by _table above
        version = self.picker.pick()
        if isinstance(data, dict) and requested is not None:
            body = json.dumps({**data, "model": version}).encode()
        return version, body

    def _handle(self, version: str, stream: bool = True) -> DeploymentHandle:
        if (version, stream) not in self.handles:
            handle = serve.get_app_handle(version_app_name(self.cfg, version))
            self.handles[version, stream] = handle.options(stream=stream)
        return self.handles[version, stream]

    async def _finish(self, version: str, started: float, outcome: str) -> None:
        """Count the request: outcome ok, refused (4xx) or failed (5xx, or a stream cut short)."""
        self.requests.inc(1, tags={"version": version, "outcome": outcome})
        if outcome == "ok":
            self.latency.observe(time.monotonic() - started, tags={"version": version})
        await self.state.served.remote(version, time.monotonic() - started, outcome)

    async def _generate(self, kind: Kind, request: Request):
        authorize(self.token, request)
        body = await json_body(request, self.cfg.max_body_bytes)
        rid = request_id(request)
        version, body = await self._route(body)
        started = time.monotonic()
        replies: Any = self._handle(version).respond.remote(kind, body, rid)  # a streaming handle: a generator
        try:
            head = await anext(replies)
        except BackPressureError:
            await self._finish(version, started, "failed")
            raise OpenAIError(503, f"version {version!r} is at capacity; retry later", type="server_error",
                              code="overloaded") from None
        except Exception as e:
            await self._finish(version, started, "failed")
            raise internal_error(rid, e) from None
        if head[0] == "error":
            await self._finish(version, started, "refused" if head[1] < 500 else "failed")
            return JSONResponse(head[2], status_code=head[1])
        if head[0] == "json":
            await anext(replies)  # ("done", id): recorded for feedback
            await self._finish(version, started, "ok")
            return JSONResponse(head[1], headers=head[2])
        return StreamingResponse(self._stream(version, started, replies), media_type="text/event-stream",
                                 headers=head[1])

    async def _stream(self, version: str, started: float, replies) -> AsyncIterator[str]:
        done = None
        try:
            async for reply in replies:
                if reply[0] == "sse":
                    yield reply[1]
                else:
                    done = reply
        finally:
            replies.cancel()  # a client that left: the version's generator closes, its rows leave the batch
            await self._finish(version, started, "ok" if done else "failed")

    @router_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate("completion", request)

    @router_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate("chat", request)

    @router_app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The versions, each with its traffic share and model; `router` names the model that routes."""
        authorize(self.token, request)
        table = await self.state.table.remote()
        data = [{"id": name, "object": "model", "owned_by": "rayrlhf", "root": model, "traffic": table["shares"][name]}
                for name, model in table["models"].items()]
        return {"object": "list", "data": data, "router": self.cfg.model_name}

    @router_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        authorize(self.token, request)
        return answered(await self.state.feedback.remote(await json_body(request, self.cfg.max_body_bytes)))

    @router_app.post("/v1/episodes")
    async def episodes(self, request: Request) -> dict:
        """An episode is built by the version that served its requests (they hold its tokens): every
        request must have been served by the same one (pin it with `model` for every turn)."""
        authorize(self.token, request)
        body = await json_body(request, self.cfg.max_body_bytes)
        served = await self.state.served_by.remote(parse_request(body, EpisodePost).requests)
        missing = [rid for rid, version in served.items() if version is None]
        if missing:
            raise OpenAIError(404, f"{missing[0]} is not among the responses this endpoint keeps", "requests",
                              code="request_not_found")
        versions = sorted(set(served.values()))
        if len(versions) > 1:
            raise OpenAIError(400, f"an episode's requests were answered by versions {', '.join(versions)}: "
                              "send every turn to one version (its name as `model`)", "requests")
        if versions[0] not in (await self._table())["models"]:
            raise OpenAIError(410, f"version {versions[0]!r}, which answered these requests, is no longer served",
                              "requests", code="expired")
        return answered(await self._handle(versions[0], stream=False).episode.remote(body))

    @router_app.get("/stats")
    async def stats(self, request: Request) -> dict:
        authorize(self.token, request)
        return await self.state.report.remote()

    @router_app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.model_name}

    # --- admin: rollout and rollback --------------------------------------------------------

    async def _admin_body(self, request: Request) -> dict:
        authorize(self.token, request)
        data = json.loads(await json_body(request, self.cfg.max_body_bytes) or b"null")
        if not isinstance(data, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        return data

    @router_app.post("/admin/versions")
    async def rollout(self, request: Request) -> dict:
        data = await self._admin_body(request)
        for field, types in (("name", str), ("model", str)):
            if not isinstance(data.get(field), types):
                raise OpenAIError(400, f"{field}: a string is required", field)
        traffic = data.get("traffic")
        if traffic is not None and (isinstance(traffic, bool) or not isinstance(traffic, (int, float))):
            raise OpenAIError(400, "traffic: a number in [0, 1] is required", "traffic")
        if set(data) - {"name", "model", "traffic"}:
            raise OpenAIError(400, f"unknown field(s): {', '.join(sorted(set(data) - {'name', 'model', 'traffic'}))}")
        return answered(await self.state.rollout.remote(data["name"], data["model"], traffic))

    @router_app.post("/admin/traffic")
    async def traffic(self, request: Request) -> dict:
        data = await self._admin_body(request)
        for name, share in data.items():
            if isinstance(share, bool) or not isinstance(share, (int, float)):
                raise OpenAIError(400, f"{name}: a share in [0, 1] is required", name)
        return answered(await self.state.set_traffic.remote(data))

    @router_app.delete("/admin/versions/{name}")
    async def rollback(self, name: str, request: Request) -> dict:
        authorize(self.token, request)
        return answered(await self.state.rollback.remote(name))


def deploy_versioned(cfg: ServeConfig) -> DeploymentHandle:
    """The state actor, every version's application, then the router's (Ray and Serve must be up)."""
    start_state(cfg, ServingState)
    targets = [RunTarget(version_app(cfg, v), name=version_app_name(cfg, v.name), route_prefix=None) for v in cfg.versions]
    options = {**deployment_options(cfg), "ray_actor_options": {"num_cpus": 0},  # it only forwards
               "max_ongoing_requests": cfg.max_ongoing_requests * len(cfg.versions)}
    router = VersionRouter.options(**options).bind(cfg.model_dump(), api_key(cfg))  # type: ignore[attr-defined]
    return serve.run_many([*targets, RunTarget(router, name=cfg.app_name, route_prefix=cfg.route_prefix)])[-1]
