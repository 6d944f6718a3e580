"""`rayrlhf eval` and the best checkpoint, end to end on the tiny model: the verb gives the run's own
final held-out figures from final/, pass@k comes out of sampled answers, best/ holds the best evaluation."""

import json

import pytest

from rayrlhf.jobs.cli import main as cli_main
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.eval import run_eval
from rayrlhf.jobs.train import train


def math_tiny(tmp_path, *overrides):
    return load_config("math_tiny", [f"output_dir={tmp_path / 'run'}", "eval.samples_per_prompt=4",
                                     "eval_every=1", "eval.best_metric=eval/raw", *overrides])


def test_eval_reproduces_the_runs_final_figures_and_best_is_kept(local_ray, tmp_path):
    cfg = math_tiny(tmp_path, "steps=2")
    result = train(cfg)
    after = json.loads((tmp_path / "run" / "eval.json").read_text())["after"]
    for k in (1, 2, 4):
        assert 0.0 <= after[f"eval/math_exact_match/pass@{k}"] <= 1.0
    assert after["eval/math_exact_match/pass@1"] <= after["eval/math_exact_match/pass@4"]
    assert "eval/raw/mean@4" in after

    # best/: the evaluation (step 0, 1 or 2) with the highest eval/raw, recorded with its step
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    evaluations = {0: result.before["eval/raw"], 2: after["eval/raw"]}
    evaluations |= {h["step"]: h["eval/raw"] for h in result.history if "eval/raw" in h}
    assert best["value"] == pytest.approx(max(evaluations.values()))
    assert evaluations[int(best["step"])] == pytest.approx(best["value"])
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()

    # the verb on final/ with the same config: the same greedy figures and the same sampled ones
    again = run_eval(load_config("math_tiny", [f"output_dir={tmp_path / 'run'}", "eval.samples_per_prompt=4",
                                              f"policy.model={result.final_dir}"]))
    for key, value in after.items():
        if key.startswith("eval/"):
            assert again.metrics[key] == pytest.approx(value, abs=1e-6), key
    report = json.loads((tmp_path / "run" / "eval_final.json").read_text())
    assert report["metrics"] == again.metrics and len(report["examples"]) == report["prompts"]


def test_eval_refuses_a_run_checkpoint_and_a_missing_model_before_ray(tmp_path, capsys, monkeypatch):
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    assert cli_main(["eval", "--config", "math_tiny", "--model", str(step)]) == 2
    assert "is a run checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", "--config", "math_tiny", "--model", str(tmp_path / "nope")]) == 2
    assert "policy.model" in capsys.readouterr().err
    # data and output paths: one line naming the cause and the fix, exit 2; the traceback only with --verbose
    assert cli_main(["eval", "--config", "math_tiny", "--model", "tiny-gpt2", "--data", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"rayrlhf eval: {tmp_path / 'x.jsonl'}: file not found"
    (tmp_path / "afile").write_text("")
    output = ["--output", str(tmp_path / "afile" / "m.json")]  # a folder that cannot be made
    assert cli_main(["eval", "--config", "math_tiny", "--model", "tiny-gpt2", *output]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--output: cannot create the folder" in err
    assert "writable folder" in err and "Traceback" not in err
    monkeypatch.setenv("RAYRLHF_VERBOSE", "0")  # --verbose sets it; restored after the test
    assert cli_main(["eval", "--config", "math_tiny", "--model", "tiny-gpt2", *output, "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
