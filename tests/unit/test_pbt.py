"""PBT's rules without Ray (jobs/run/pbt.py): which fields a resumed trial may change, which the learner
takes over from the config, the events and the best trial's schedule; and the config's checks."""

import pytest

from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.tune import load_tune_config
from rayrlhf.jobs.run import checkpoint, pbt
from rayrlhf.jobs.run.state import plan


def test_only_the_weights_kl_coefficient_and_lr_may_change_on_a_pbt_resume():
    saved = load_config("tiny", ["seed=1"]).model_dump()
    saved["reward"]["functions"] = [{"path": "m:exact", "name": "", "weight": 1.0}]
    current = load_config("tiny", ["seed=2", "learner.lr=0.5", "kl.coef=0.2", "reward.alpha=0.3"]).model_dump()
    current["reward"]["functions"] = [{"path": "m:exact", "name": "", "weight": 2.0}]
    both = ["kl.coef", "learner.lr", "reward.alpha", "reward.functions.exact.weight", "seed"]
    assert checkpoint.changed_fields(saved, current) == both
    assert checkpoint.changed_fields(saved, current, free=pbt.perturbable) == ["seed"]
    current["reward"]["functions"][0]["path"] = "m:other"  # another function: not a weight change
    assert "reward.functions" in checkpoint.changed_fields(saved, current, free=pbt.perturbable)
    assert not any(pbt.perturbable(f) for f in ("learner.micro_batch_size", "kl.target", "reward.normalize", "seed"))


def test_plan_lets_a_pbt_trial_resume_under_perturbed_settings_only(tmp_path):
    trained = load_config("tiny", ["learner.lr=0.001"])
    path = checkpoint.write(tmp_path, 2, trained.model_dump(), {}, lambda where: None, {}, keep=1)
    perturbed = load_config("tiny", ["learner.lr=0.002", "reward.beta=0.5"])
    with pytest.raises(ConfigError, match="learner.lr, reward.beta"):
        plan(perturbed, tmp_path, str(path))
    assert plan(perturbed, tmp_path, str(path), retune=True).checkpoint == path
    with pytest.raises(ConfigError, match="in seed"):
        plan(load_config("tiny", ["learner.lr=0.002", "seed=7"]), tmp_path, str(path), retune=True)


def test_learner_overrides_are_the_changed_learner_settings():
    saved = load_config("tiny", ["learner.lr=0.001", "kl.coef=0.05"]).model_dump()
    assert pbt.learner_overrides(saved, saved) == {}  # a plain resume keeps the restored (adaptive) values
    current = load_config("tiny", ["learner.lr=0.002", "kl.coef=0.05", "reward.alpha=2"]).model_dump()
    assert pbt.learner_overrides(saved, current) == {"lr": 0.002}
    current["kl"]["coef"] = 0.06
    assert pbt.learner_overrides(saved, current) == {"lr": 0.002, "kl_coef": 0.06}


def test_clip_keeps_perturbed_values_in_their_ranges():
    bounds = {"simplex_share_1": [0.2, 0.8], "learner.lr": [1e-4, 1e-2]}
    assert pbt.clip({"simplex_share_1": 0.96, "learner.lr": 5e-5, "reward.bleu": 3.0}, bounds) == {
        "simplex_share_1": 0.8, "learner.lr": 1e-4, "reward.bleu": 3.0}


def test_events_are_recorded_once_and_the_schedule_follows_the_lineage(tmp_path):
    a0, b0 = {"learner.lr": 1.0}, {"learner.lr": 2.0}
    assert pbt.change_event(2, "b", "b", b0, b0) is None  # a pause or retry: nothing changed
    exploit_b = pbt.change_event(2, "b", "a", a0, {"learner.lr": 0.8})  # b took a's checkpoint of step 2
    exploit_a = pbt.change_event(4, "a", "b", {"learner.lr": 0.8}, {"learner.lr": 0.96})
    assert exploit_b["kind"] == "exploit" and exploit_b["before"] == a0
    for trial, start, later in (("a", a0, exploit_a), ("b", b0, exploit_b)):
        folder = tmp_path / trial
        folder.mkdir()
        first = {"step": 0, "kind": "start", "trial": trial, "donor": trial, "before": {}, "after": start}
        assert pbt.append_event(folder, first)
        assert pbt.append_event(folder, later)
        assert not pbt.append_event(folder, later)  # a retried trial records its exploit once
    events = {t: pbt.read_events(tmp_path / t) for t in "ab"}
    assert len(events["a"]) == 2
    # a's final policy: a's start until 2, then b's settings (b took a's step 2) until 4, then a's own
    assert pbt.schedule(events, "a") == [
        {"step": 0, "trial": "a", "learner.lr": 1.0}, {"step": 2, "trial": "b", "learner.lr": 0.8},
        {"step": 4, "trial": "a", "learner.lr": 0.96}]
    assert pbt.schedule(events, "b") == [
        {"step": 0, "trial": "a", "learner.lr": 1.0}, {"step": 2, "trial": "b", "learner.lr": 0.8}]


def test_pbt_config_checks(tmp_path):
    setup = load_tune_config("tune_pbt_tiny")
    point = {"simplex_share_1": 0.5, "learner.lr": 1e-3, "kl.coef": 0.05}
    assert setup.run_config(setup.cfg.search.field_values(point)).eval_every == 2  # the interval
    cases = {
        "search.space.learner.micro_batch_size={values: [4, 8]}": "can change only",
        "search.space.kl.coef={low: 0, high: 0.1}": "kl.coef must stay above 0",
        "search.num_samples=1": "needs a population",
        "storage_path=s3://bucket/tune": "needs storage_path to be a path",
        "trial.steps=2": "never perturbed",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_tune_config("tune_pbt_tiny", [override])
