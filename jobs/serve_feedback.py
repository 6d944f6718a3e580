"""Every endpoint's state actor: the answers it served, kept for feedback, and the feedback files.

One detached Ray actor per endpoint (named after the Serve application with the HTTP route), so
that every replica records each complete answer in one place before it returns it, and a rating
that reaches any replica finds the answer another one served (docs/serving_versions.md). A
versioned endpoint's actor is a ServingState (jobs/serve_state.py), a FeedbackStore with the
versions, their shares and counts. Threaded (max_concurrency): answers are recorded while a rating
is written.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import ray

from rayrlhf.actors.serving.feedback import FeedbackBook, Served, parse_feedback
from rayrlhf.actors.serving.openai_schema import OpenAIError
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.serve import ServeConfig

NAMESPACE = "rayrlhf"
RATINGS_FILE, PAIRS_FILE = "ratings.jsonl", "preferences.jsonl"


def state_name(app_name: str) -> str:
    """The state actor of the endpoint whose HTTP route is the Serve application `app_name`."""
    return f"serving-state-{app_name}"


def append_rows(storage: Storage, name: str, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines to a file of the storage (created if missing)."""
    if not rows:
        return
    path = f"{storage.root}/{name}"
    storage.filesystem.create_dir(storage.root, recursive=True)
    with storage.filesystem.open_append_stream(path) as out:
        out.write("".join(json.dumps(r) + "\n" for r in rows).encode())


class FeedbackStore:
    """The served answers an endpoint keeps for feedback, and the files feedback is written to."""

    def __init__(self, config: dict) -> None:
        self.cfg = cfg = ServeConfig.model_validate(config)
        self.lock = threading.Lock()
        self.book = FeedbackBook(cfg.feedback.max_records, cfg.feedback.max_age_s)
        self.storage = Storage(cfg.feedback.output_dir)
        self.counts = {"ratings": 0, "pairs": 0}

    def record(self, answer: Served) -> None:
        with self.lock:
            self.book.record(answer)

    def served_by(self, ids: list[str]) -> dict[str, str | None]:
        """The version (served model name) that answered each id, None for one not in the window."""
        with self.lock:
            return {rid: answer.version if (answer := self.book.served.get(rid)) else None for rid in ids}

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
            return {"feedback": {"kept": len(self.book), **self.counts, "output_dir": self.storage.location}}


def stop_state(app_name: str) -> None:
    """Kill the endpoint's state actor, if one runs, and wait until its name is free."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.kill(ray.get_actor(state_name(app_name), namespace=NAMESPACE))
        except ValueError:  # none (any more)
            return
        time.sleep(0.2)


def state_actor(cfg: ServeConfig, app_name: str, cls: type[FeedbackStore] = FeedbackStore,
                get_if_exists: bool = True) -> Any:
    """The state actor of the endpoint `app_name`, detached so that it outlives the driver of a
    cluster deployment and is shared by every replica: the one already running under that name
    (whatever its class), or a new `cls`."""
    return ray.remote(cls).options(
        name=state_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=get_if_exists,
        num_cpus=0, max_concurrency=16,
    ).remote(cfg.model_dump())


def start_state(cfg: ServeConfig, cls: type[FeedbackStore] = FeedbackStore) -> Any:
    """A fresh state actor for the endpoint cfg.app_name (`rayrlhf serve`, before its applications)."""
    stop_state(cfg.app_name)
    actor = state_actor(cfg, cfg.app_name, cls, get_if_exists=False)
    ray.get(actor.report.remote())
    return actor
