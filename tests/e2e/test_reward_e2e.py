"""User rewards end to end: ray_configs/math_tiny.yaml (a GSM8K-style file, the built-in
math_exact_match, a user reward file reading extra data fields) plus a remote reward on a real HTTP
server on 127.0.0.1 that fails its first call, truncation masking, beam-search evaluation and a
monitor that stops the run; real Ray actors, the tiny model. One run covers all of it (~30 s)."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
from safetensors.numpy import load_file
from score_server import ScoreServer

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.jobs.config.base import CONFIG_DIR
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.train import train

REPO = CONFIG_DIR.parent


@pytest.fixture
def server():
    srv = ScoreServer(fail_first=1)
    yield srv
    srv.close()


def test_math_rewards_remote_mask_beams_and_monitor_stop(local_ray, tmp_path, monkeypatch, server):
    monkeypatch.chdir(REPO)  # the example config's paths are relative to the repo root
    cfg = load_config("math_tiny", [
        f"output_dir={tmp_path / 'run'}", "steps=3", "kl.coef=0", "learner.zero_stage=0",
        f"reward.remote={{url: '{server.url}', timeout_s: 10, retries: 2, weight: 0.1}}",
        "reward.truncation=mask", "eval.num_beams=2",
        "monitor.max_truncated_frac=0.5", "monitor.stop_on=[truncation]",  # every answer is cut: stop at step 1
    ])  # fmt: skip
    result = train(cfg)

    (step,) = result.history  # stopped by the monitor after step 1 of 3
    assert step["health/truncation"] == 1.0 and step["reward/truncated_frac"] > 0.5
    assert step["health/length"] == 0.0 and "reward/length_ratio" in step  # step 1 is the length baseline
    for key in ("reward/math_exact_match", "reward/mentioned", "reward/remote", "reward/truncated_frac"):
        assert np.isfinite(step[key]), key
    assert 0.0 <= step["reward/math_exact_match"] <= 1.0
    for key in ("eval/math_exact_match", "eval/mentioned", "eval/remote", "eval/sim"):
        assert key in result.before and key in result.after, key

    # the remote reward: a 500 first (retried), then every batch (eval before, the step, eval after)
    # with each row's extra data fields
    assert len(server.requests) >= 4
    rows = server.requests[-1]["extras"]
    assert rows and all(set(r) == {"answer", "steps"} for r in rows)

    # truncation=mask: the random model never ends an answer in 16 tokens, so every row left the
    # loss; the gradient was 0 and the policy is exactly the one it started from
    assert step["reward/truncated_frac"] == 1.0 and step["grad_norm"] == 0.0
    start = load_file(str(resolve_policy("tiny-gpt2") / "model.safetensors"))
    end = load_file(str(result.final_dir / "model.safetensors"))
    assert all(np.array_equal(start[k], end[k]) for k in start)

    out = result.output_dir
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 1]  # before, the one step, after
    assert lines[1]["health/truncation"] == 1.0  # the flag that stopped it reaches metrics.jsonl
    assert matplotlib.image.imread(out / "training.png").shape[0] > 400
