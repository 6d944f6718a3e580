"""The model server of `rayrlhf serve`: one Ray Serve deployment that is both the FastAPI ingress and
the policy, behind an OpenAI-compatible HTTP API.

Handlers parse and check a request (actors/serving/openai_requests.py), then hand its GenerationRequest
to a ContinuousScheduler (actors/serving/scheduler.py), which admits it into the running decode batch
at the next step (continuous batching, actors/generation/decode_loop.py) and yields the request's
Updates as they come, so streaming and plain responses share one path. All torch work (loading,
decode steps, beam search) runs on one torch thread (actors/runtime/torch_thread.py), so the event
loop keeps accepting requests and health checks, and OpenMP keeps one pool of threads.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations
of the methods that serve.ingress wraps.)

Bodies are checked and read by jobs/serve_http.py, then parsed and tokenised on worker threads with
tokenizers of their own, so neither the event loop, nor the decode thread, nor a small request waits
for a long prompt. Evidence of batching: headers x-rayrlhf-batch-requests / -batch-sequences (the
most that shared a decode step with this request) and GET /stats.

Every complete answer is recorded in the endpoint's state actor (jobs/serve_feedback.py) before it is
returned, so `POST /v1/feedback` can rate it on whichever replica the rating arrives. A versioned
endpoint (jobs/serve_router.py) runs this server once per version, behind a router that calls
`respond` and `episode` through DeploymentHandles instead of HTTP. jobs/serve.py builds and runs
the application.
"""

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr
from ray import serve

from rayrlhf.actors.generation.beam_search import beam_update
from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.generation.requests import GenerationRequest, Update
from rayrlhf.actors.runtime.devices import role_device
from rayrlhf.actors.runtime.models import resolve_policy_here
from rayrlhf.actors.runtime.torch_thread import TorchThread
from rayrlhf.actors.serving.openai_requests import Job, Kind, Limits, OpenAIEngine
from rayrlhf.actors.serving.openai_schema import EpisodePost, OpenAIError, parse_request, sse
from rayrlhf.actors.serving.scheduler import ContinuousScheduler
from rayrlhf.actors.serving.text_generator import TextGenerator
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.data.episodes import append_episode, from_turns
from rayrlhf.jobs.serve_feedback import state_actor
from rayrlhf.jobs.serve_http import answered, authorize, internal_error, json_body, openai_app, request_id

logger = logging.getLogger("ray.serve")

PARSE_THREADS = 2
"""Threads that parse and tokenise request bodies: with one, a small request would wait for a huge
prompt's tokenisation; more would take cores from the decode thread when huge prompts arrive together."""

RECORDED_REQUESTS = 1024
"""Requests made with logprobs or return_token_ids that a replica keeps for POST /v1/episodes."""

STALL_GRACE_S = 2.0
"""How long past its deadline a request may wait for a step before it gets 504 regardless."""

app = openai_app("rayrlhf")


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
