"""LoRA targets: "all-linear" fits any architecture; a wrong name fails before Ray starts."""

import ray

from rayrlhf.actors.runtime.models import add_lora, load_policy, missing_lora_targets
from rayrlhf.jobs.cli import main as cli_main


def test_missing_targets_are_named_and_all_linear_fits_gpt2(tiny_dir):
    assert missing_lora_targets(tiny_dir, ["q_proj", "c_attn", "mlp.c_fc"]) == ["q_proj"]
    assert missing_lora_targets(tiny_dir, "all-linear") == []
    model, _ = load_policy(tiny_dir)
    wrapped = add_lora(model, rank=2, alpha=4.0, target_modules="all-linear")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    assert any(n.endswith("attn.c_attn") for n in adapted) and any(n.endswith("mlp.c_proj") for n in adapted)
    assert not any(n.endswith("lm_head") for n in adapted)  # the output head stays as it is


def test_a_wrong_target_fails_before_ray_starts(capsys):
    code = cli_main(["train", "--config", "tiny", "--set", "policy.lora.rank=4",
                     "--set", "policy.lora.target_modules=[q_proj]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "policy.lora.target_modules: ['q_proj'] match no layer of tiny-gpt2" in err and "all-linear" in err
    assert not ray.is_initialized()
