"""train-rm and sft without Ray: configs, data, the built-in preference set, the step schedule,
SFT encoding and loss, the reward model's save/load, and the learned reward inside RewardScorer."""

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from rayrlhf.actors.runtime.models import load_policy, resolve_policy
from rayrlhf.actors.rewards.reward_model import (
    RewardModel,
    check_reward_model_dir,
    resolve_backbone,
)
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.generation.tokens import prompt_token_ids
from rayrlhf.actors.supervised.sft import collate, encode_example, response_nll
from rayrlhf.actors.rl.trajectory import Prompt, Trajectory
from rayrlhf.jobs.cli import main as cli_main
from rayrlhf.jobs.config.base import CONFIG_DIR, ConfigError, load_yaml
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.supervised import RMConfig, SFTConfig, load_job_config
from rayrlhf.jobs.data.preferences import (
    PreferencePair,
    builtin_preferences,
    wrong_answer,
)
from rayrlhf.jobs.data.prompts import DataError
from rayrlhf.jobs.data.supervised import RatedSample, load_rm_data, load_sft_data
from rayrlhf.jobs.data.task import builtin_task, family_stream
from rayrlhf.jobs.run.ray_trainer import step_indices, total_steps
from rayrlhf.jobs.train import prepare as rl_prepare
from rayrlhf.jobs.train_rm import prepare as rm_prepare
from rayrlhf.jobs.train_rm import rm_inputs

SCHEMAS = {"rm.yaml": RMConfig, "rm_tiny.yaml": RMConfig, "sft.yaml": SFTConfig, "sft_tiny.yaml": SFTConfig}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_shipped_configs_validate(name):
    cfg = load_job_config(SCHEMAS[name], name, [], name)
    dumped = flatten(cfg.model_dump())
    for key, value in flatten(load_yaml(CONFIG_DIR / name)).items():
        assert dumped[key] == value, f"{name}: {key}"


@pytest.mark.parametrize(
    ("schema", "name", "override", "field"),
    [
        (RMConfig, "rm_tiny", "loss.name=dpo", "loss.name"),
        (RMConfig, "rm_tiny", "trainer.zero_stage=4", "trainer.zero_stage"),
        (RMConfig, "rm_tiny", "trainer.micro_batch_sise=4", "trainer.micro_batch_sise"),
        (RMConfig, "rm_tiny", "loss.focal_alpha=2", "loss.focal_alpha"),
        (SFTConfig, "sft_tiny", "policy.dtype=int8", "policy.dtype"),
        (SFTConfig, "sft_tiny", "trainer.offload=true", "trainer.offload needs trainer.zero_stage"),
    ],
)
def test_bad_field_is_named(schema, name, override, field):
    extra = ["trainer.zero_stage=0"] if "offload" in override else []
    with pytest.raises(ConfigError) as err:
        load_job_config(schema, name, [override, *extra], name)
    assert field in str(err.value)


def test_bad_input_fails_before_ray_starts(tmp_path, capsys):
    assert not ray.is_initialized()
    assert cli_main(["train-rm", "--config", "rm_tiny", "--set", "model=/no/such/dir"]) == 2
    assert "model:" in capsys.readouterr().err
    assert cli_main(["sft", "--config", "sft_tiny", "--set", "data.train=/no/such.jsonl"]) == 2
    assert "no/such.jsonl: file not found" in capsys.readouterr().err
    assert cli_main(["sft", "--config", "sft_tiny", "--set", "data.num_train=4"]) == 2
    assert "fewer than one step needs" in capsys.readouterr().err
    # the learned reward in RL: a weight without a model, then a model directory that is not one
    with pytest.raises(ConfigError, match="reward.rm_weight != 0 needs reward.rm_model"):
        load_config("tiny", ["reward.rm_weight=1"])
    with pytest.raises(ConfigError, match="reward.rm_model: .*reward_model.json is missing"):
        rl_prepare(load_config("tiny", ["reward.rm_weight=1", f"reward.rm_model={resolve_policy('tiny-gpt2')}"]))
    assert not ray.is_initialized()


# --- data ---------------------------------------------------------------------------------


def test_builtin_preferences_are_derived_from_the_task():
    train, held = builtin_preferences(300, 60, seed=3)
    assert (train, held) == builtin_preferences(300, 60, seed=3)
    assert len(train) == 300 and len(held) == 60
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    # the RL job's held-out prompts (same seed, fewer held out) are held out here too
    _, rl_held = builtin_task(10, 40, seed=3)
    assert {p.text for p in rl_held} <= {p.prompt for p in held}
    references = {p.text: p.reference for p in builtin_task(300, 60, seed=3)[0]}
    family_of = {text: family for family, q, ref in family_stream(3) for text in (q, ref)}
    for pair in train:
        assert pair.chosen == references[pair.prompt] and pair.rejected != pair.chosen
        head, answer = pair.chosen[:-1].rsplit(" is ", 1)
        if pair.kind == "truncated":
            assert f"{head} is".startswith(pair.rejected)  # cut off before the answer
        elif pair.kind == "wrong":
            assert pair.rejected.startswith(head + " is ") and not pair.rejected.endswith(f" is {answer}.")
        elif pair.kind == "off_topic":
            assert family_of[pair.rejected] != family_of[pair.prompt]  # a right answer, to another question
        else:
            assert pair.kind == "corrupted"
            assert sorted(pair.rejected.split()) == sorted(pair.chosen[:-1].split())
    assert {p.kind for p in train} == {"wrong", "truncated", "off_topic", "corrupted"}


def test_wrong_answer_moves_a_number_or_swaps_a_word():
    rng = random.Random(0)
    for _ in range(20):
        wrong = wrong_answer("17 plus 25 is 42.", [], rng)
        number = int(wrong.removeprefix("17 plus 25 is ").removesuffix("."))
        assert number != 42 and 37 <= number <= 47
    others = ["The opposite of hot is cold.", "The opposite of up is down."]
    assert wrong_answer("The opposite of up is down.", others, rng) == "The opposite of up is cold."


def test_rm_files_pairs_rated_and_errors(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n" for i in range(20)
    ))
    train, held = load_rm_data(str(pairs), None, 100, 100, seed=0)
    assert len(train) == 18 and len(held) == 2 and isinstance(held[0], PreferencePair)  # 10% held out
    rated = tmp_path / "rated.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "response": ["x", "y", "z"], "label": [1, 0, 1]}).to_parquet(rated)
    train, held = load_rm_data(str(rated), None, 5, 5, seed=0)
    assert len(train) == 2 and len(held) == 1
    assert all(isinstance(r, RatedSample) and r.score is None and r.label in (0, 1) for r in train + held)
    with pytest.raises(DataError, match="one holds preference pairs, the other rated samples"):
        load_rm_data(str(pairs), str(rated), 5, 5, seed=0)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "response": "r", "label": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2: 'label' must be 0 or 1"):
        load_rm_data(str(bad), None, 10, 10, 0)
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "response": "r", "score": 0.5}\n')
    with pytest.raises(DataError, match="mixes preference pairs and rated samples"):
        load_rm_data(str(bad), None, 10, 10, 0)
    # a pairwise loss needs pairs; cross-entropy needs labels: both fail in prepare(), before Ray
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"prompt": "q", "response": "r", "score": i / 10}) + "\n" for i in range(40)))
    cfg = load_job_config(RMConfig, "rm_tiny", [f"data.train={scored}", "loss.name=hinge"], "rm_tiny")
    with pytest.raises(ConfigError, match="loss.name=hinge needs preference pairs"):
        rm_prepare(cfg)
    cfg = load_job_config(RMConfig, "rm_tiny", [f"data.train={scored}", "loss.name=cross_entropy"], "rm_tiny")
    with pytest.raises(ConfigError, match="needs a 'label'"):
        rm_prepare(cfg)


def test_rm_inputs_layout():
    rows = [PreferencePair("p1", "c1", "r1"), PreferencePair("p2", "c2", "r2")]
    prompts, responses, targets, n = rm_inputs(rows, "bradley_terry")
    assert (prompts, responses, targets.tolist(), n) == (
        ["p1", "p2", "p1", "p2"], ["c1", "c2", "r1", "r2"], [1.0, 1.0, 0.0, 0.0], 2
    )
    rated = [RatedSample("p", "a", score=0.25, label=1), RatedSample("q", "b", score=None, label=0)]
    assert rm_inputs(rated, "mse")[2].tolist() == [0.25, 0.0]  # the label stands in for a missing score
    assert rm_inputs(rated, "focal")[2].tolist() == [1.0, 0.0]


def test_sft_data_builtin_and_file(tmp_path):
    train, held = load_sft_data("builtin", None, 12, 4, seed=1)
    assert [p.reference for p in train] == [p.reference for p in builtin_task(12, 4, 1)[0]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    train, held = load_sft_data(str(path), None, 100, 100, seed=0)
    assert len(train) == 9 and len(held) == 1 and all(p.reference == "a" + p.text[1:] for p in train + held)
    path.write_text('{"prompt": "q"}\n{"prompt": "r", "response": "s"}\n')
    with pytest.raises(DataError, match="line 1: an SFT row needs a non-empty 'response'"):
        load_sft_data(str(path), None, 10, 10, 0)


# --- the step schedule ---------------------------------------------------------------------


def test_step_indices_split_each_epoch_between_ranks():
    n, micro, accum, world = 50, 4, 2, 2  # 16 items a step: 3 steps an epoch, 2 items dropped
    trainer = dict(epochs=2, micro_batch_size=micro, accumulation=accum, num_workers=world, max_steps=None)
    assert total_steps(n, trainer) == 6 and total_steps(n, {**trainer, "max_steps": 4}) == 4
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(3 * epoch, 3 * epoch + 3):
            parts = [step_indices(n, step, 7, rank, world, micro, accum) for rank in range(world)]
            assert all(len(p) == accum and all(len(b) == micro for b in p) for p in parts)
            seen += [i for p in parts for b in p for i in b]
        assert len(seen) == len(set(seen)) == 48  # no item twice within an epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert step_indices(n, 4, 7, 1, world, micro, accum) == step_indices(n, 4, 7, 1, world, micro, accum)
    with pytest.raises(ValueError, match="cannot fill one step"):
        step_indices(10, 0, 0, 0, world, micro, accum)


# --- SFT encoding and loss -------------------------------------------------------------------


def test_sft_example_renders_the_prompt_as_the_rollout_does():
    model, tokenizer = load_policy(resolve_policy("tiny-gpt2"))
    prompt = Prompt(id=0, text="What is 2 plus 3?", reference="2 plus 3 is 5.")
    ids, mask = encode_example(tokenizer, prompt, use_chat_template=True, system_prompt=None,
                               max_prompt_tokens=64, max_response_tokens=32)
    head = prompt_token_ids(tokenizer, prompt, use_chat_template=True, system_prompt=None, max_prompt_tokens=64)
    body = tokenizer("2 plus 3 is 5.", add_special_tokens=False).input_ids
    assert ids == head + body + [tokenizer.eos_token_id]
    assert mask == [0] * len(head) + [1] * (len(body) + 1)
    short, short_mask = encode_example(tokenizer, prompt, use_chat_template=True, system_prompt=None,
                                       max_prompt_tokens=64, max_response_tokens=3)
    assert short[-3:] == body[:2] + [tokenizer.eos_token_id] and sum(short_mask) == 3

    # the loss: cross-entropy of the response tokens only, as F.cross_entropy computes it
    other = encode_example(tokenizer, Prompt(id=1, text="Hi", reference="Hello there."), use_chat_template=True,
                           system_prompt=None, max_prompt_tokens=64, max_response_tokens=32)
    batch = collate([(ids, mask), other], tokenizer.pad_token_id)
    with torch.no_grad():
        total, tokens = response_nll(model, batch)
        expected = 0.0
        for row_ids, row_mask in [(ids, mask), other]:
            logits = model(torch.tensor([row_ids])).logits[0, :-1]
            ce = F.cross_entropy(logits, torch.tensor(row_ids[1:]), reduction="none")
            expected += float((ce * torch.tensor(row_mask[1:], dtype=torch.float32)).sum())
    assert tokens.item() == sum(mask) + sum(other[1])
    assert total.item() == pytest.approx(expected, rel=1e-4)


# --- the reward model and the learned reward in RewardScorer -------------------------------


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(resolve_backbone("tiny-gpt2"), max_length=32)
    return rm.save(tmp_path_factory.mktemp("rm") / "final", {"loss": "bradley_terry"})


def test_reward_model_round_trip(tiny_rm_dir):
    assert check_reward_model_dir(str(tiny_rm_dir)) == tiny_rm_dir
    rm = RewardModel.load(tiny_rm_dir)
    prompts, answers = ["What is 2 plus 3?", "Hi"], ["2 plus 3 is 5.", "Hello"]
    scores = rm.score(prompts, answers, batch_size=1)
    assert scores.shape == (2,) and scores.dtype == np.float32 and scores[0] != scores[1]
    # plain transformers reads the same directory: backbone and head, one label
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    assert hf.config.num_labels == 1
    with torch.no_grad():
        logits = hf(**rm.tokenize(prompts[:1], answers[:1])).logits
    assert logits.item() == pytest.approx(float(scores[0]), abs=1e-5)
    assert json.loads((tiny_rm_dir / "reward_model.json").read_text())["max_length"] == 32


def test_encoder_backbone_reads_prompt_and_answer_as_a_pair():
    rm = RewardModel.from_backbone(resolve_backbone("all-minilm-l6-v2"), max_length=16)
    assert rm.pair_input
    batch = rm.tokenize(["What is 2 plus 3?"], ["2 plus 3 is 5."])
    assert batch["token_type_ids"][0].tolist().count(1) > 0  # the answer is the second segment
    assert batch["input_ids"].shape[1] <= 16
    rewards, embeddings = rm(batch, with_embeddings=True)
    assert rewards.shape == (1,) and embeddings.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def scorer_kwargs(**overrides) -> dict:
    kwargs = dict(alpha=1.0, beta=0.5, bleu=0.0, rouge_l=0.0, freq_mode="mean", empty_reward=-1.0,
                  embedding_model="all-minilm-l6-v2", normalize="none", torch_threads=1,
                  rm_weight=0.0, rm_model=None, rm_batch_size=2)
    return {**kwargs, **overrides}


def traj(prompts: list[str], responses: list[str], references: list[str]) -> Trajectory:
    b = len(responses)
    zeros = np.zeros((b, 2), dtype=np.int64)
    return Trajectory(
        input_ids=zeros, attention_mask=zeros + 1, response_mask=np.zeros((b, 2), np.float32),
        old_logprobs=np.zeros((b, 2), np.float32), group_ids=np.arange(b), sample_ids=np.arange(b),
        policy_version=0, prompts=["<templated>"] * b, responses=responses, references=references,
        prompt_texts=prompts,
    )


def test_learned_reward_is_a_weighted_component(tiny_rm_dir):
    batch = traj(["What is 2 plus 3?", "What is 2 plus 3?", "Name a day."],
                 ["2 plus 3 is 5.", "It is 7.", "Monday."], ["2 plus 3 is 5.", "2 plus 3 is 5.", "Monday is a day."])
    plain = RewardScorer(**scorer_kwargs(rm_model="/not/loaded/at/weight/0"))
    assert "rm" not in plain.components and "rm" not in plain.score(batch).components

    scorer = RewardScorer(**scorer_kwargs(rm_weight=2.0, rm_model=str(tiny_rm_dir)))
    out = scorer.score(batch)
    expected_rm = RewardModel.load(tiny_rm_dir).score(batch.prompt_texts, batch.responses, batch_size=8)
    np.testing.assert_allclose(out.components["rm"], expected_rm, atol=1e-5)  # read the prompt as asked
    c = out.components
    # normalize=none: total = 1.0 * freq + 0.5 * sim + 2.0 * rm
    np.testing.assert_allclose(out.total, c["freq"] + 0.5 * c["sim"] + 2.0 * c["rm"], atol=1e-5)

    normed = RewardScorer(**scorer_kwargs(rm_weight=2.0, rm_model=str(tiny_rm_dir), normalize="components"))
    normed.score(batch)
    assert normed.normalizers["rm"].count == 3  # normalised like the other components
    assert normed.state_dict().keys() == {"freq", "sim", "bleu", "rouge_l", "rm", "total"}
