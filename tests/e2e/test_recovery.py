"""In-job recovery, tested by killing real processes (kill -9 by PID, found among this test's own Ray
processes by their title): the rollout worker, the reward scorer and the reference policy die in the
middle of a step, and a stopped scorer hangs one. The run ends normally with every planned sample
trained exactly once, each restart counted, and the same per-step metrics as the run without faults."""

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

STEPS = 5
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


ROLES = ("rollout", "reward", "reference")


def test_a_hung_scorer_and_roles_killed_mid_step_restart_and_the_run_ends_as_without_faults(baseline, tmp_path, capsys):
    """One run, one fault per step after the first, each landing inside the step that follows it: the
    reward scorer stopped (SIGSTOP), so step 2's scoring times out; then kill -9 of the rollout worker
    in step 3's generation, of the reward scorer in step 4's scoring, of the reference policy in step
    5's log-probs. Each fault restarts its own role only, and every step ends as without faults."""
    cfg = tiny(tmp_path, "fault_tolerance.score_timeout_s=5")  # waited out once: short, yet far above a scoring call
    hang = Fault("RewardScorer", None, sig=signal.SIGSTOP, after=1)
    kills = {  # role: (its fault, its name in the log)
        "rollout": (Fault("RolloutWorker", "generate", after=2), "rollout worker 0"),
        "reward": (Fault("RewardScorer", "score", after=3), "reward scorer 0"),
        "reference": (Fault("ReferencePolicy", "logprobs", after=4), "reference policy 0"),
    }
    faults = [hang, *(fault for fault, _ in kills.values())]
    result = train(cfg, on_step=lambda step, metrics: [fault.on_step(step, metrics) for fault in faults])

    history = result.history
    assert len(history) == STEPS
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)  # each planned sample, once
    restarts = [{name: h[f"faults/restarts/{name}"] for name in ROLES} for h in history]
    assert restarts == [  # after each step: the one role its fault hit, restarted once more
        dict(rollout=0, reward=0, reference=0),
        dict(rollout=0, reward=1, reference=0),  # the hung scorer
        dict(rollout=1, reward=1, reference=0),
        dict(rollout=1, reward=2, reference=0),
        dict(rollout=1, reward=2, reference=1),
    ]
    for got, want in zip(history, baseline.history):
        for key in SAME_AS_WITHOUT_FAULT:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
    out = capsys.readouterr().out

    # the hung scorer: timed out once, restarted, its samples kept (only their scoring redone)
    assert [h["faults/score_retries"] for h in history[:2]] == [0, 1]
    assert [h["faults/redone"] for h in history[:2]] == [0, 0]
    assert "scoring attempt 1 failed (no answer within fault_tolerance.score_timeout_s=5)" in out

    # each kill: inside the call, the process gone, its phase redone in that step, one restart logged
    redone = [h["faults/redone"] for h in history]
    assert redone[1] < redone[2] < redone[3] < redone[4], redone
    for role, (fault, who) in kills.items():
        assert fault.pid is not None and not psutil.pid_exists(fault.pid), role
        assert fault.in_call, f"the kill missed {fault.cls}.{fault.method}"
        assert out.count(f"recovery: {who} restarted (pid {fault.pid} -> ") == 1, out


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
