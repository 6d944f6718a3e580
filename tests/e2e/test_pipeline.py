"""The pipelined loop (jobs/run/pipeline.py, pipeline.max_staleness=1) on real Ray with the tiny model:
batches are trained one version after the one that sampled them, every planned sample once and in
order; a run interrupted with a batch in flight resumes exactly, also through a learner restart; a
rollout worker killed while it generates the batch ahead (during learning) is restarted and the run
ends as without the fault; a reward failing while the batch ahead is collected ends the run with a
checkpoint that resumes exactly."""

import json
import os
import signal

import numpy as np
import pytest

from rayrlhf.actors.rl.offpolicy import admitted
from rayrlhf.actors.rl.shard import pack, unpack
from rayrlhf.actors.rl.trajectory import Rewards, Trajectory
from rayrlhf.cluster.faults import Fault, actor_process
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.checkpoint import Interrupted
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run import ahead as ahead_file
from rayrlhf.jobs.run.recovery import ScoreError
from rayrlhf.jobs.train import train
from tests.e2e.test_errors_keep_work import FLAKY
from tests.e2e.test_recovery import SAME_AS_WITHOUT_FAULT, planned
from tests.e2e.test_resume import assert_same_run, interrupt_at

STEPS = 3


def cfg_in(out, *overrides):
    return load_config("tiny", [f"output_dir={out}", f"steps={STEPS}", "logging.tensorboard=false",
                                "pipeline.max_staleness=1", *overrides])


def test_admission_bounds_the_staleness():
    assert admitted(3, 3, 0) and not admitted(4, 3, 0)
    assert admitted(4, 3, 1) and not admitted(5, 3, 1) and admitted(5, 3, 2)
    assert not admitted(3, 4, 2)  # a batch from a newer policy than the learner's: never


def test_a_ranks_shards_are_packed_and_unpacked_in_one_layout():
    trajectories, rewards, refs = ["t0", "t1", "t2", "t3"], ["r0", "r1", "r2", "r3"], ["x0", None, "x2", None]
    parts = pack(trajectories, rewards, refs, ranks=2)  # shard i to rank i % 2
    assert parts == [["t0", "t2", "r0", "r2", "x0", "x2"], ["t1", "t3", "r1", "r3", None, None]]
    assert unpack(parts[1]) == (["t1", "t3"], ["r1", "r3"], [None, None])
    assert pack(trajectories, rewards, refs, ranks=1) == [trajectories + rewards + refs]
    with pytest.raises(ValueError, match="one reward and one reference entry per trajectory"):
        pack(trajectories, rewards[:3], refs, ranks=2)
    with pytest.raises(ValueError, match="three lists"):
        unpack(parts[0][:5])


def shard(seed: int, with_ref: bool) -> tuple[Trajectory, Rewards, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    traj = Trajectory(
        input_ids=rng.integers(0, 50, (2, 5)), attention_mask=np.ones((2, 5), np.int64),
        response_mask=np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32),
        old_logprobs=rng.normal(size=(2, 5)).astype(np.float32), group_ids=np.array([3, 3]),
        sample_ids=np.array([12, 13]) + seed, policy_version=4, prompts=["p", "p"], responses=["a", "b ü"],
        references=["r", None], prompt_texts=[[{"role": "user", "content": "p"}]] * 2,
        extras=[{"answer": np.int64(7), "tags": np.array([1, 2])}, {}], truncated=np.array([False, True]),
        max_new_tokens=8,
    )  # fmt: skip
    rewards = Rewards(total=rng.normal(size=2).astype(np.float32), raw_total=np.array([0.5, np.nan], np.float32),
                      components={"freq": np.array([1.0, 2.0]), "rouge_l": np.array([0.0, 1.0])},
                      loss_mask=None if with_ref else np.array([1.0, 0.0], np.float32),
                      info={"truncated_frac": np.array([0.0, 1.0])})  # fmt: skip
    return traj, rewards, rng.normal(size=(2, 5)).astype(np.float32) if with_ref else None


def test_the_batch_ahead_is_saved_as_arrays_and_json_and_read_back_whole(tmp_path):
    shards = [shard(0, True), shard(1, False)]
    saved = ahead_file.Ahead([s[0] for s in shards], [s[1] for s in shards], [s[2] for s in shards], {"time/generate": 1.5})
    ahead_file.save(tmp_path, saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ahead.json", "ahead.npz"]
    with np.load(tmp_path / "ahead.npz", allow_pickle=False) as arrays:  # no object arrays: plain numbers only
        assert all(arrays[k].dtype != object for k in arrays.files)
    loaded = ahead_file.load(tmp_path)
    assert loaded.times == {"time/generate": 1.5} and loaded.ref_logprobs[1] is None
    for got, want in zip((*loaded.trajectories, *loaded.rewards), (*saved.trajectories, *saved.rewards)):
        for name, value in vars(want).items():
            other = getattr(got, name)
            if isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
                assert value.keys() == other.keys() and all(np.array_equal(value[k], other[k], equal_nan=True) for k in value)
            elif isinstance(value, np.ndarray):
                assert other.dtype == value.dtype and np.array_equal(other, value, equal_nan=True), name
            elif name == "extras":  # numpy values of a Parquet row come back as their Python equivalents
                assert other == [{"answer": 7, "tags": [1, 2]}, {}]
            else:
                assert other == value, name
    np.testing.assert_array_equal(loaded.ref_logprobs[0], saved.ref_logprobs[0])
    assert ahead_file.load(tmp_path / "nothing-here") is None
    assert "Trajectory" not in (tmp_path / "ahead.json").read_text()  # no class or module names
    json.loads((tmp_path / "ahead.json").read_text())


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipelined") / "uninterrupted"
    return out, train(cfg_in(out))


def test_pipelined_run_trains_each_planned_sample_once_one_version_late(reference):
    out, result = reference
    cfg = cfg_in(out)
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)
    history = result.history
    assert [h["pipeline/staleness"] for h in history] == [0.0, 1.0, 1.0]  # the first batch has nothing to lag
    assert [h["version"] for h in history] == [1.0, 2.0, 3.0]
    assert [h["rollout/version"] for h in history] == [1.0, 2.0, 3.0]  # synced after every update
    # on-policy, rollout and learner log-probs differ only by float rounding; a version late, visibly
    assert history[0]["pipeline/mismatch_kl"] < 1e-6
    assert all(h["pipeline/mismatch_kl"] > 1e-5 for h in history[1:])
    assert all(0.0 <= h["pipeline/is_clip_frac"] <= 1.0 for h in history)


def kill_learner_after(k: int):
    """An on_step callback that kill -9s the (one) learner rank's process after step k, once (step k is redone)."""
    killed = []

    def on_step(step: int, metrics: dict) -> None:
        if step == k and not killed:
            killed.append(actor_process("Learner").pid)
            os.kill(killed[0], signal.SIGKILL)
    return on_step


def test_interrupted_with_a_batch_in_flight_resumes_exactly(reference, tmp_path):
    """SIGINT after step 1 (step 2's batch in flight), resume; in the resumed job the learner is
    killed after step 2, so the group restarts from step 1's checkpoint and its batch ahead again."""
    ref_out, ref_result = reference
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        train(cfg_in(out), on_step=interrupt_at(1))
    saved = stopped.value.checkpoint
    assert checkpoint.step_of(saved) == 1
    ahead = ahead_file.load(saved)  # step 2's batch, collected during step 1, is in the checkpoint
    assert sorted(i for t in ahead.trajectories for i in t.sample_ids.tolist()) == sorted(ref_result.trained_samples[1])
    assert not list(saved.glob("*.pkl"))
    result = train(cfg_in(out), on_step=kill_learner_after(2))
    assert result.trained_samples == ref_result.trained_samples[1:]  # none lost, none trained twice
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [h["restarts/learner"] for h in result.history] == [0.0, 1.0, 1.0]  # steps 2 and 3 redone
    assert_same_run(ref_out, out, skip=("restarts/learner",))


def test_a_rollout_worker_killed_during_learning_is_restarted_and_the_batch_redone(reference, tmp_path, capsys):
    _, baseline = reference
    cfg = cfg_in(tmp_path / "run")
    fault = Fault("RolloutWorker", "generate")  # after step 1: inside step 2, generating step 3's batch
    result = train(cfg, on_step=fault.on_step)
    assert fault.in_call and fault.pid is not None
    assert [sorted(ids) for ids in result.trained_samples] == planned(cfg)
    assert result.history[-1]["faults/restarts/rollout"] == 1.0 and result.history[-1]["faults/redone"] >= 1
    for got, want in zip(result.history, baseline.history):
        for key in (*SAME_AS_WITHOUT_FAULT, "pipeline/mismatch_kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
    assert "recovery: rollout worker 0 restarted" in capsys.readouterr().out


def test_a_failed_collect_of_the_batch_ahead_ends_the_run_with_a_checkpoint_that_resumes_exactly(reference, tmp_path):
    """A reward fails every retry while step 2 collects step 3's batch (the learner making step 2's
    update): step 2 ends, and the error stops the run with a checkpoint of step 2 that owes step 3's
    batch, with the weights that are to sample it (version 1). Once fixed, the same command trains
    step 3 as the run without the error did."""
    ref_out, ref_result = reference
    (tmp_path / "flaky.py").write_text(FLAKY)  # fails from its 4th call: eval, batch 1, 2, then 3
    (tmp_path / "broken").touch()
    out = tmp_path / "run"
    cfg = cfg_in(out, "fault_tolerance.score_retries=0",
                 f"reward.functions=[{{path: '{tmp_path / 'flaky.py'}:flaky', weight: 0.0}}]")
    with pytest.raises(ScoreError, match="the reward service is down"):
        train(cfg)
    saved = checkpoint.latest(out)
    assert saved is not None and checkpoint.step_of(saved) == 2  # none on schedule (every: 0)
    state = checkpoint.read(saved)[2]
    assert state["learner"]["version"] == 2 and [s["version"] for s in state["rollout"]] == [1]
    assert ahead_file.load(saved) is None and ahead_file.load_weights(saved) is not None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

    (tmp_path / "broken").unlink()
    result = train(cfg)
    assert result.trained_samples == ref_result.trained_samples[2:]  # none lost, none trained twice
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert_same_run(ref_out, out, skip=("reward/flaky", "eval/flaky", "faults/score_retries"))  # the failed try counts
