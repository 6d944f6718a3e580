"""The run-config schema: every shipped YAML validates, and bad input names its field."""

from pathlib import Path

import pytest
import ray

from rayrlhf.jobs.cli import main as cli_main
from rayrlhf.jobs.config.base import CONFIG_DIR, ConfigError, load_yaml, parse_overrides
from rayrlhf.jobs.config.run import RewardFunctionConfig, RunConfig, load_config

SUPERVISED_CONFIGS = {"rm.yaml", "rm_tiny.yaml", "sft.yaml", "sft_tiny.yaml"}  # tests/unit/test_supervised.py
RUN_CONFIGS = sorted(
    p for p in CONFIG_DIR.glob("*.yaml") if p.name not in {"serve.yaml", *SUPERVISED_CONFIGS} and not p.name.startswith("tune")
)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # every key written in the file survived validation with the value written there
    raw = load_yaml(path)
    dumped = cfg.model_dump()
    for section, value in raw.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if (section, key) == ("reward", "functions"):  # file paths made absolute, names filled in
                    inner = [RewardFunctionConfig.model_validate(f).model_dump() for f in inner]
                assert dumped[section][key] == inner, f"{path.name}: {section}.{key}"
        else:
            assert dumped[section] == value


def test_default_is_the_schema_default():
    cfg = load_config()
    assert cfg.policy.model == "smollm2-135m-instruct"
    assert cfg.algorithm.name == "grpo" and cfg.data.train == "builtin"


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["learner.zero_stage=3", "reward.alpha=0.25", "name=x"]) == {
        "learner": {"zero_stage": 3}, "reward": {"alpha": 0.25}, "name": "x",
    }
    cfg = load_config("tiny", ["learner.zero_stage=3", "rollout.temperature=0.7"])
    assert cfg.learner.zero_stage == 3 and cfg.rollout.temperature == 0.7


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("learner.zero_staeg=1", "learner.zero_staeg"),
        ("algorithm.name=dpo", "algorithm.name"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("reward.normalize=sometimes", "reward.normalize"),
        ("kl.estimator=k2", "kl.estimator"),
    ],
)
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert field in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_config("tiny", ["rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="multiple of rollout.num_workers"):
        load_config("tiny", ["rollout.num_workers=3"])
    with pytest.raises(ConfigError, match="nccl needs learner.num_gpus"):
        load_config("tiny", ["learner.backend=nccl"])


def test_a_checkpoint_saved_before_the_loss_fields_resumes_and_the_presets():
    from rayrlhf.jobs.run.checkpoint import changed_fields

    cfg = load_config("tiny")
    saved = cfg.model_dump()  # as the version before algorithm.loss_scale_tokens / clip_eps_low / high wrote it
    for key in ("loss_scale_tokens", "clip_eps_low", "clip_eps_high"):
        del saved["algorithm"][key]
    assert changed_fields(saved, cfg.model_dump()) == []
    assert changed_fields(saved, load_config("tiny", ["algorithm.clip_eps_high=0.28"]).model_dump()) == [
        "algorithm.clip_eps_high"]
    dr = load_config("tiny", ["algorithm.name=dr_grpo"])
    assert dr.algorithm.loss_aggregation == "seq-mean-token-sum-norm" and cfg.algorithm.loss_aggregation == "token-mean"
    with pytest.raises(ConfigError, match="dr_grpo needs rollout.samples_per_prompt >= 2"):
        load_config("tiny", ["algorithm.name=dr_grpo", "rollout.samples_per_prompt=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("tiny", ["learner.zero_stage"])


def test_cli_rejects_bad_config_before_ray_starts(capsys):
    assert not ray.is_initialized()
    assert cli_main(["train", "--config", "tiny", "--set", "learner.zero_stage=7"]) == 2
    assert "learner.zero_stage" in capsys.readouterr().err
    assert cli_main(["train", "--config", "tiny", "--set", "policy.model=/no/such/model/dir"]) == 2
    assert "policy.model" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_cli_reports_a_run_the_cluster_cannot_hold(capsys, tmp_path):
    """A launch failure is the user's to fix (here: a GPU this machine lacks): exit 2, no traceback, no Ray left."""
    assert cli_main(["train", "--config", "tiny", "--set", "learner.num_gpus=1", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "could not start the run" in err and "GPU: needs 1, cluster has 0" in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()
