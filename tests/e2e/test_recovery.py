"""In-job recovery, tested by killing real processes (kill -9 by PID, found among this test's own Ray
processes by their title): the rollout worker, the reward scorer and the reference policy die in the
middle of a step. Each run ends normally with every planned sample trained exactly once, the restart
counted, and the same per-step metrics as the run without the fault."""

import signal

import numpy as np
import psutil
import pytest

from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.cluster.faults import Fault
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.run.recovery import RecoveryError, ScoreError
from rayrlhf.jobs.data.sampler import PromptSampler
from rayrlhf.jobs.train import train

STEPS = 3
SAME_AS_WITHOUT_FAULT = ("reward/total", "reward/raw", "reward/sim", "loss", "kl", "response_length", "grad_norm")


def tiny(path, *overrides):
    return load_config("tiny", [f"output_dir={path / 'run'}", f"steps={STEPS}", *overrides])


@pytest.fixture(scope="module")
def baseline(local_ray, tmp_path_factory):
    return train(tiny(tmp_path_factory.mktemp("baseline")))


def planned(cfg) -> list[list[int]]:
    """The sample ids each step must train: the prompts the sampler draws, k samples each."""
    train_set, _ = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
    sampler, k = PromptSampler(train_set, cfg.seed), cfg.rollout.samples_per_prompt
    return [sorted(p.id * k + j for p in sampler.draw(cfg.prompts_per_step) for j in range(k)) for _ in range(cfg.steps)]


def test_a_fresh_worker_given_the_counter_samples_what_the_lost_one_would_have():
    settings = dict(
        model="tiny-gpt2", max_prompt_tokens=64, use_chat_template=True, system_prompt=None,
        samples_per_prompt=4, max_new_tokens=6, temperature=1.0, top_p=1.0, torch_threads=1, seed=3,
    )  # fmt: skip
    prompts = [Prompt(id=5, text="What is 2 plus 3?", reference="5")]
    lost = RolloutWorker(**settings)
    first = lost.generate(prompts)
    state = lost.state_dict()
    assert state == {"version": 0, "calls": 1}
    second = lost.generate(prompts)
    assert not np.array_equal(first.input_ids, second.input_ids)  # each call draws anew

    fresh = RolloutWorker(**settings)  # as Ray restarts it: constructor only
    fresh.load_state_dict(state)
    again = fresh.generate(prompts)
    assert np.array_equal(again.input_ids, second.input_ids)
    assert np.array_equal(again.old_logprobs, second.old_logprobs)


def assert_recovered(result, cfg, baseline, role: str) -> None:
    assert len(result.history) == STEPS
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)  # each planned sample, once
    last = result.history[-1]
    restarts = {name: last[f"faults/restarts/{name}"] for name in ("rollout", "reward", "reference")}
    assert restarts == {name: float(name == role) for name in restarts}
    for got, want in zip(result.history, baseline.history):
        for key in SAME_AS_WITHOUT_FAULT:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


@pytest.mark.parametrize(("cls", "method", "role", "who"), [
    ("RolloutWorker", "generate", "rollout", "rollout worker 0"),
    ("RewardScorer", "score", "reward", "reward scorer 0"),
    ("ReferencePolicy", "logprobs", "reference", "reference policy 0"),
])
def test_a_role_killed_mid_step_restarts_and_the_step_is_redone(baseline, tmp_path, capsys, cls, method, role, who):
    cfg = tiny(tmp_path)
    fault = Fault(cls, method)
    result = train(cfg, on_step=fault.on_step)
    assert fault.pid is not None and not psutil.pid_exists(fault.pid)
    assert fault.in_call, f"the kill missed {cls}.{method}"
    assert_recovered(result, cfg, baseline, role)
    assert result.history[-1]["faults/redone"] >= 1
    assert result.history[0]["faults/redone"] == 0
    out = capsys.readouterr().out
    assert out.count(f"recovery: {who} restarted (pid {fault.pid} -> ") == 1, out


def test_a_hung_scorer_times_out_is_restarted_and_scores_again(baseline, tmp_path, capsys):
    cfg = tiny(tmp_path, "fault_tolerance.score_timeout_s=5")  # waited out once: short, yet far above a scoring call
    fault = Fault("RewardScorer", None, sig=signal.SIGSTOP)  # stopped between steps 1 and 2
    result = train(cfg, on_step=fault.on_step)
    assert_recovered(result, cfg, baseline, "reward")
    assert result.history[-1]["faults/score_retries"] == 1
    assert result.history[-1]["faults/redone"] == 0  # the samples were kept, only their scoring redone
    out = capsys.readouterr().out
    assert "scoring attempt 1 failed (no answer within fault_tolerance.score_timeout_s=5)" in out


def test_scoring_that_never_answers_in_time_fails_the_run_clearly(local_ray, tmp_path):
    cfg = tiny(tmp_path, "kl.coef=0", "fault_tolerance.score_timeout_s=0.001", "fault_tolerance.score_retries=1")
    with pytest.raises(ScoreError, match=r"failed 2 times \(fault_tolerance.score_retries=1\), last: no answer "
                                         r"within fault_tolerance.score_timeout_s=0.001; the step is not trained"):
        train(cfg)


def test_a_death_past_max_actor_restarts_ends_the_run_naming_the_limit(local_ray, tmp_path):
    cfg = tiny(tmp_path, "fault_tolerance.max_actor_restarts=0", "kl.coef=0")
    fault = Fault("RolloutWorker", None)
    with pytest.raises(RecoveryError, match=r"rollout worker 0 died .*max_actor_restarts=0"):
        train(cfg, on_step=fault.on_step)
