"""`rayrlhf serve`: a policy behind an OpenAI-compatible HTTP endpoint on Ray Serve.

One deployment is both the FastAPI ingress and the model: handlers parse and check a request
(actors/serving/openai_requests.py), then hand its GenerationRequest to a ContinuousScheduler
(actors/serving/scheduler.py), which admits it into the running decode batch at the next step
(continuous batching, actors/generation/decode_loop.py) and yields the request's Updates as they come, so
streaming and plain responses share one path. All torch work (loading, decode steps, beam search)
runs on one torch thread (actors/runtime/torch_thread.py), so the event loop keeps accepting requests and
health checks, and OpenMP keeps one pool of threads.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations
of the methods that serve.ingress wraps.)

Hostile traffic: a JSON endpoint takes only `Content-Type: application/json` (415; a web page can
POST text/plain to 127.0.0.1 without asking), reads at most max_body_bytes (413, at once when
Content-Length says so), and parses and tokenises the body on worker threads with tokenizers of
their own, so neither the event loop, nor the decode thread, nor a small request waits for a long
prompt. Serve's proxy holds at most max_queued_requests beyond the replicas' max_ongoing_requests
and answers the rest 503 with Retry-After. The API key is read where the app is built and travels
as an init argument.

Every response carries Serve's `x-request-id` header; an internal error answers 500 with a
generic message naming that id, and the traceback goes to the replica's log under it. Evidence of
batching: headers x-rayrlhf-batch-requests / -batch-sequences (the most that shared a decode
step with this request) and GET /stats.

Every complete answer is recorded in the endpoint's state actor (jobs/serve_feedback.py) before it is
returned, so `POST /v1/feedback` can rate it on whichever replica the rating arrives. A versioned
endpoint (jobs/serve_router.py) runs this server once per version, behind a router that calls
`respond` and `episode` through DeploymentHandles instead of HTTP.
"""

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from transformers import AutoConfig

from rayrlhf.actors.serving.scheduler import ContinuousScheduler
from rayrlhf.actors.generation.beam_search import beam_update
from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.runtime.devices import role_device
from rayrlhf.actors.runtime.models import resolve_policy, resolve_policy_here
from rayrlhf.actors.serving.openai_requests import Job, Kind, Limits, OpenAIEngine
from rayrlhf.actors.serving.openai_schema import EpisodePost, OpenAIError, parse_request, sse
from rayrlhf.actors.generation.requests import GenerationRequest, Update
from rayrlhf.actors.serving.text_generator import TextGenerator, context_length
from rayrlhf.actors.runtime.torch_thread import TorchThread
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.base import ConfigError, validate
from rayrlhf.cluster.storage import Storage, is_uri
from rayrlhf.jobs.config.serve import ServeConfig, VersionConfig
from rayrlhf.jobs.data.episodes import append_episode, from_turns
from rayrlhf.jobs.serve_feedback import start_state, state_actor

logger = logging.getLogger("ray.serve")

PARSE_THREADS = 2
"""Threads that parse and tokenise request bodies: with one, a small request would wait for a huge
prompt's tokenisation; more would take cores from the decode thread when huge prompts arrive together."""

RECORDED_REQUESTS = 1024
"""Requests made with logprobs or return_token_ids that a replica keeps for POST /v1/episodes."""

STALL_GRACE_S = 2.0
"""How long past its deadline a request may wait for a step before it gets 504 regardless."""

app = FastAPI(title="rayrlhf", docs_url=None, redoc_url=None)


def request_id(request: Request) -> str:
    """Serve's id of this request: its proxy sets (or keeps the client's) x-request-id on the way
    in and puts it on every response; the replica's log lines carry it too."""
    rid = request.headers.get("x-request-id")
    if rid is None:  # not behind Serve's proxy
        if not hasattr(request.state, "request_id"):
            request.state.request_id = uuid.uuid4().hex
        rid = request.state.request_id
    return rid


def _error(request: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def internal_error(rid: str, err: BaseException) -> OpenAIError:
    """A generic 500 naming the request id; the details go to the server log only."""
    logger.error("request %s failed: %s: %s", rid, type(err).__name__, err, exc_info=err)
    return OpenAIError(500, f"internal server error (request id {rid}; details are in the server log)",
                       type="server_error")


@app.exception_handler(OpenAIError)
async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
    return _error(request, err)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return _error(request, OpenAIError(err.status_code, str(err.detail), code=str(err.status_code)))


@app.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    return _error(request, internal_error(request_id(request), err))


def answered(reply: tuple) -> Any:
    """The value of a ("ok", value) reply (the state actor's, a version's), or its ("error", status, body) raised."""
    if reply[0] == "ok":
        return reply[1]
    error = reply[2]["error"]
    raise OpenAIError(reply[1], error["message"], error["param"], error["type"], error["code"])


def authorize(token: str | None, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (nothing to check without a token)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def json_body(request: Request, cap: int) -> bytes:
    """The body of a JSON request, 415 / 413 before any of it is parsed: at most cap (+1) bytes are
    read, none when Content-Length is already above it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(415, f"Content-Type must be application/json, not {media_type or 'none'!r}",
                          code="unsupported_media_type")
    too_large = OpenAIError(413, f"the request body is larger than this server's max_body_bytes={cap}",
                            code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)


@serve.deployment
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, config: dict, api_key: SecretStr | None = None, endpoint: str | None = None) -> None:
        """endpoint: the Serve application whose state actor keeps this server's answers for feedback
        (a versioned endpoint's router); None: this server's own application."""
        self.cfg = cfg = ServeConfig.model_validate(config)
        self.torch = TorchThread(cfg.threads)
        self.generator = generator = self.torch.call(  # resolved on this replica's node, on its device
            TextGenerator, resolve_policy_here(cfg.model, cfg.cache_dir), cfg.dtype, cfg.threads, role_device(cfg.num_gpus)
        )
        limits = Limits(
            default_max_tokens=cfg.default_max_tokens, max_tokens=cfg.max_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens, max_rows=cfg.max_batch_size,
            request_timeout_s=cfg.request_timeout_s,
        )
        self.engine = OpenAIEngine(generator, cfg.model_name, limits)
        self.scheduler = ContinuousScheduler(DecodeLoop(generator, cfg.max_batch_size), cfg.join_wait_steps, self.torch)
        self._beam_lock = asyncio.Lock()
        """One beam search at a time on the torch thread; decode steps run between its tokens."""
        self.beam_searches = 0
        """Running or waiting for their turn (GET /stats)."""
        self._parser = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="parse")
        self.token = api_key.get_secret_value() if api_key else None
        self.records: OrderedDict[str, list[dict]] = OrderedDict()
        """The last RECORDED_REQUESTS requests made with logprobs or return_token_ids: episodes are built from them."""
        self.policy_version = 0
        self.state = state_actor(cfg, endpoint or serve.get_replica_context().app_name)

    def _authorize(self, request: Request) -> None:
        authorize(self.token, request)

    async def _beams(self, generation: GenerationRequest) -> AsyncGenerator[Update, None]:
        self.beam_searches += 1
        done = False
        try:
            async with self._beam_lock:  # the decode steps queued meanwhile run between its tokens
                update = await self.torch.run(beam_update, self.generator, generation, self.torch.yield_turn)
                done = True
            yield update
        finally:
            self.beam_searches -= 1
            if not done:  # its caller left: the search ends at its next token
                generation.cancelled = True

    async def _updates(self, job: Job, rid: str) -> AsyncGenerator[Update, None]:
        """The job's Updates, with a hard deadline; its rows leave the batch if we stop."""
        generation = job.generation
        stream = self._beams(generation) if generation.num_beams > 1 else self.scheduler.run(generation)
        try:
            while True:
                wait = generation.deadline - time.monotonic() + STALL_GRACE_S
                try:
                    yield await asyncio.wait_for(anext(stream), max(wait, 0.0))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise OpenAIError(
                        504, f"generation did not finish within request_timeout_s={self.cfg.request_timeout_s:g}",
                        type="timeout", code="timeout",
                    ) from None
                except Exception as e:  # e.g. GenerationError: a diverged checkpoint's NaN logits
                    raise internal_error(rid, e) from None
        finally:
            await stream.aclose()  # cancels its rows if they are not done

    @staticmethod
    def _headers(job: Job) -> dict[str, str]:
        requests, sequences = job.batch
        return {"x-rayrlhf-batch-requests": str(requests), "x-rayrlhf-batch-sequences": str(sequences)}

    async def _start(self, kind: Kind, body: bytes, rid: str) -> tuple[Job, list[dict], AsyncGenerator[Update, None]]:
        """The parsed job, its first events (a plain response: none, the first Update is taken in),
        and the rest of its Updates; failures before the first token raise (a plain 4xx / 5xx)."""
        job = await asyncio.get_running_loop().run_in_executor(self._parser, self.engine.parse, kind, body)
        updates = self._updates(job, rid)
        try:
            first = await anext(updates)
            if not job.stream:
                job.add(first)
                return job, [], updates
            return job, job.chunks(first), updates
        except StopAsyncIteration:
            raise internal_error(rid, RuntimeError("the scheduler ended without output")) from None
        except OpenAIError:
            await updates.aclose()
            raise

    async def _collect(self, job: Job, updates: AsyncGenerator[Update, None]) -> dict:
        try:
            async for update in updates:
                job.add(update)
        finally:
            await updates.aclose()
        await self._remember(job)
        return job.response()

    async def _generate(self, kind: Kind, request: Request):
        self._authorize(request)
        body = await json_body(request, self.cfg.max_body_bytes)
        job, events, updates = await self._start(kind, body, request_id(request))
        if job.stream:
            return StreamingResponse(
                self._sse(job, events, updates), media_type="text/event-stream", headers=self._headers(job)
            )
        return JSONResponse(await self._collect(job, updates), headers=self._headers(job))

    async def respond(self, kind: Kind, body: bytes, rid: str) -> AsyncIterator[tuple]:
        """The same for a router in front (jobs/serve_router.py), through a streaming DeploymentHandle:
        ("error", status, body) | ("json", response, headers) | ("stream", headers) then ("sse", event)
        ..., and after a complete answer ("done", id)."""
        try:
            job, events, updates = await self._start(kind, body, rid)
            response = None if job.stream else await self._collect(job, updates)
        except OpenAIError as err:
            yield "error", err.status, err.body()
            return
        if response is not None:
            yield "json", response, self._headers(job)
        else:
            yield "stream", self._headers(job)
            event = ""
            async for event in self._sse(job, events, updates):
                yield "sse", event
            if event != sse("[DONE]"):
                return
        yield "done", job.id

    async def _sse(self, job: Job, first: list[dict], updates: AsyncGenerator[Update, None]) -> AsyncIterator[str]:
        """The events of a stream; if the client goes away, closing this closes `updates` (rows freed)."""
        try:
            for event in first:
                yield sse(event)
            async for update in updates:
                for event in job.chunks(update):
                    yield sse(event)
        except OpenAIError as err:  # the status line is already sent: report in the stream
            yield sse(err.body())
            return
        finally:
            await updates.aclose()
        await self._remember(job)
        yield sse("[DONE]")

    async def _remember(self, job: Job) -> None:
        """Keep a complete answer: for episodes (made with logprobs or token ids) here, for feedback in
        the endpoint's state actor, before the client has it."""
        if job.generation.logprobs:
            self.records[job.id] = job.record()
            while len(self.records) > RECORDED_REQUESTS:
                self.records.popitem(last=False)
        try:
            await self.state.record.remote(job.served())
        except Exception as e:  # the answer stands; only feedback on it will be refused (404)
            logger.warning("response %s is not kept for feedback: %s: %s", job.id, type(e).__name__, e)

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        """A rating or a preference on answers this endpoint served (docs/serving_versions.md)."""
        self._authorize(request)
        return answered(await self.state.feedback.remote(await json_body(request, self.cfg.max_body_bytes)))

    @app.post("/v1/episodes")
    async def episodes(self, request: Request) -> dict:
        """An extension: the caller's reward for the requests (turns, in order) of one episode; the
        episode (ids, log-probs, loss mask) is built from what this replica returned, appended to
        episodes_file if set, and returned (docs/serving_gateway.md)."""
        self._authorize(request)
        return self._episode(await json_body(request, self.cfg.max_body_bytes))

    async def episode(self, body: bytes) -> tuple:
        """POST /v1/episodes for a router in front: ("ok", episode) or ("error", status, body)."""
        try:
            return "ok", self._episode(body)
        except OpenAIError as err:
            return "error", err.status, err.body()

    def _episode(self, body: bytes) -> dict:
        post = parse_request(body, EpisodePost)
        missing = [rid for rid in post.requests if rid not in self.records]
        if missing:
            raise OpenAIError(404, f"{missing[0]} is not among this replica's last {RECORDED_REQUESTS} requests made with "
                              "logprobs or return_token_ids", "requests", code="request_not_found")  # fmt: skip
        turns = [self.records[rid] for rid in post.requests]
        if any(len(turn) != 1 for turn in turns):
            raise OpenAIError(400, "an episode's requests must each have one choice (n=1)", "requests")
        try:
            episode = from_turns([turn[0] for turn in turns], post.reward, self.policy_version, post.requests,
                                 self.engine.model_name)
        except ValueError as e:
            raise OpenAIError(400, str(e), "requests") from None
        if self.cfg.episodes_file:
            append_episode(self.cfg.episodes_file, episode)
        return asdict(episode)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate("chat", request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return self.engine.models()

    @app.get("/stats")
    async def batch_stats(self, request: Request) -> dict:
        self._authorize(request)
        replica = serve.get_replica_context().replica_id.unique_id
        return {"replica": replica, "pid": os.getpid(), "max_batch_size": self.cfg.max_batch_size,
                "beam_searches": self.beam_searches, **self.scheduler.stats.as_dict(),
                **await self.state.report.remote()}

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.engine.model_name}


# --- building and running the application --------------------------------------------------


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
    """One version of a versioned endpoint: this module's server for version.model, answering to
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
