"""User reward functions, the built-in math_exact_match, the remote reward (a real HTTP server on
127.0.0.1), length control, and their config: validated before Ray starts, searchable by tune."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from score_server import ScoreServer

from rayrlhf.actors.rewards import components
from rayrlhf.actors.rewards.components import RewardBatch
from rayrlhf.actors.rewards.embeddings import Embedder
from rayrlhf.actors.rewards.length_control import LengthControl, overlong_penalty
from rayrlhf.actors.rewards.math_answers import final_number, math_exact_match
from rayrlhf.actors.rewards.names import RESERVED
from rayrlhf.actors.rewards.remote import RemoteReward, RemoteRewardError
from rayrlhf.actors.rewards.user_functions import (
    RewardFunctionError,
    as_scores,
    batch_arguments,
    call_function,
    check_functions,
    load_function,
)
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rl.trajectory import Rewards, Trajectory, loss_rows
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.tune import load_tune_config
from rayrlhf.jobs.run.roles import actor_settings
from rayrlhf.jobs.train import prepare

USER_REWARDS = '''
def exact_match(prompts, completions, references):
    return [None if r is None else float(c.strip() == r.strip()) for c, r in zip(completions, references)]

def by_difficulty(completions, difficulty, **kwargs):
    """An extra data field (difficulty) arrives as a keyword list; kwargs get the rest."""
    assert set(kwargs) >= {"prompts", "references"}
    return [None if d is None else len(c) * d for c, d in zip(completions, difficulty)]

def needs_unknown(completions, secret):
    return [0.0] * len(completions)

def wrong_length(completions, **_):
    return [1.0]

def not_numbers(completions, **_):
    return ["high"] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


# ---------------------------------------------------------------- math_exact_match


def test_final_number_reads_gsm8k_markers_and_last_numbers():
    assert final_number("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 9") == 9
    assert final_number("#### 1,000 dollars, not 5") == 1000  # the number right after the marker
    assert final_number("It costs $1,234.50 in all.") == Fraction(246900, 200)
    assert final_number("From 5 she gives 7, leaving -2.") == -2
    assert final_number("no digits here") is None and final_number(None) is None


def test_math_exact_match_hand_checked():
    completions = ["So the answer is 72.", "#### 70", "seventy-two", "I think 72.0", "42"]
    references = ["48 + 24 = 72 apples\n#### 72", "#### 72", "#### 72", "#### 72", None]
    # 72 == 72; 70 != 72; no number -> 0; 72.0 == 72 exactly; no reference -> not applicable
    assert math_exact_match([None] * 5, completions, references) == [1.0, 0.0, 0.0, 1.0, None]


# ---------------------------------------------------------------- loading, signature, calling


def test_load_function_by_file_module_and_builtin(rewards_file):
    assert load_function("math_exact_match") is math_exact_match
    assert load_function("rayrlhf.actors.rewards.math_answers:math_exact_match") is math_exact_match
    fn = load_function(f"{rewards_file}:exact_match")
    assert fn([None], ["4"], ["4 "]) == [1.0]
    assert load_function(f"{rewards_file}:exact_match") is fn  # the file is imported once


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("{dir}/missing.py:f", r"file .*missing\.py not found"),
        ("{file}:nope", r"has no function 'nope'"),
        ("{file}:NOT_CALLABLE", r"NOT_CALLABLE is a int, not a function"),
        ("no_such_module_xyz:f", r"cannot import module no_such_module_xyz"),
        ("exact_match", r"expected FILE\.py:FUNCTION"),
    ],
)
def test_load_function_errors_name_the_problem(rewards_file, path, message):
    with pytest.raises(RewardFunctionError, match=message):
        load_function(path.format(dir=rewards_file.parent, file=rewards_file))


def test_check_functions_signature_against_data_fields(rewards_file):
    ok = [{"path": f"{rewards_file}:by_difficulty", "name": "hard"}, {"path": "math_exact_match", "name": "m"}]
    check_functions(ok, {"difficulty"})
    with pytest.raises(RewardFunctionError, match=r"reward.functions\[0\] \(hard\): .*'difficulty' is neither"):
        check_functions(ok, set())
    with pytest.raises(RewardFunctionError, match=r"required parameter 'secret'.*fields: \['difficulty'\]"):
        check_functions([{"path": f"{rewards_file}:needs_unknown", "name": "x"}], {"difficulty"})


def test_call_function_passes_extras_and_maps_none_to_nan(rewards_file):
    kwargs = batch_arguments(["q1", "q2", "q3"], ["ab", "abcd", "x"], ["ab", None, "y"],
                             [{"difficulty": 2}, {"difficulty": 0.5}, {}])  # fmt: skip
    assert kwargs["difficulty"] == [2, 0.5, None]  # a row without the field gets None
    scores = call_function(load_function(f"{rewards_file}:by_difficulty"), "hard", kwargs)
    np.testing.assert_array_equal(scores, np.array([4.0, 2.0, np.nan], dtype=np.float32))  # len * difficulty
    exact = call_function(load_function(f"{rewards_file}:exact_match"), "em", kwargs)  # no **kwargs: only its names
    np.testing.assert_array_equal(exact, np.array([1.0, np.nan, 0.0], dtype=np.float32))
    with pytest.raises(RewardFunctionError, match=r"'bad' returned 1 scores for 3 rows"):
        call_function(load_function(f"{rewards_file}:wrong_length"), "bad", kwargs)
    with pytest.raises(RewardFunctionError, match=r"row 0 is 'high', not a number"):
        call_function(load_function(f"{rewards_file}:not_numbers"), "bad", kwargs)
    with pytest.raises(RewardFunctionError, match=r"'hard' raised TypeError"):
        call_function(load_function(f"{rewards_file}:by_difficulty"), "hard", {**kwargs, "difficulty": [{}] * 3})


# ---------------------------------------------------------------- length control


def test_overlong_penalty_hand_computed():
    # budget 32, buffer 0.25 -> the last 8 tokens: penalty 0 up to 24, (n - 24) / 8 * P beyond, P at 32
    lengths = np.array([10, 24, 26, 28, 31, 32])
    np.testing.assert_allclose(overlong_penalty(lengths, 32, 1.0, 0.25), [0, 0, 0.25, 0.5, 0.875, 1.0])
    # buffer 0.5 -> the last 16 tokens, penalty 2: 2 * (n - 16) / 16 -> 24: 1.0, 26: 1.25, 28: 1.5, 31: 1.875
    np.testing.assert_allclose(overlong_penalty(lengths, 32, 2.0, 0.5), [0, 1.0, 1.25, 1.5, 1.875, 2.0])
    assert not overlong_penalty(lengths, 0, 1.0, 0.25).any()  # budget unknown: no penalty
    assert overlong_penalty(np.array([11, 12]), 12, 1.0, 0.01).tolist() == [0.0, 1.0]  # a buffer of at least 1 token


def traj(responses, references, lengths, truncated, budget, extras=None) -> Trajectory:
    b, width = len(responses), max(lengths) + 1
    response_mask = np.zeros((b, width), np.float32)
    for i, n in enumerate(lengths):
        response_mask[i, 1 : 1 + n] = 1
    ids = np.zeros((b, width), np.int64)
    return Trajectory(
        input_ids=ids, attention_mask=ids + 1, response_mask=response_mask, old_logprobs=response_mask * 0,
        group_ids=np.arange(b), sample_ids=np.arange(b), policy_version=0, prompts=["q"] * b,
        responses=responses, references=references, prompt_texts=["q"] * b,
        extras=extras or [{} for _ in responses], truncated=np.array(truncated), max_new_tokens=budget,
    )  # fmt: skip


def test_length_control_penalize_mask_keep():
    t = traj(["a b", "a b c d", "a b c d e f"], ["a b c d", None, "a b"], [4, 7, 8], [False, False, True], budget=8)
    # buffer 0.5 of 8 = 4 tokens from 4: lengths 4, 7, 8 -> 0, 0.75, 1.0 times 2.0
    penalize = LengthControl(2.0, 0.5, "penalize", 3.0)
    np.testing.assert_allclose(penalize.penalty(t), [0.0, 1.5, 2.0 + 3.0])  # + 3 for the cut row
    assert penalize.loss_mask(t) is None
    mask = LengthControl(2.0, 0.5, "mask", 3.0)
    np.testing.assert_allclose(mask.penalty(t), [0.0, 1.5, 2.0])
    assert mask.loss_mask(t).tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(LengthControl(0.0, 0.5, "keep", 3.0).penalty(t), [0, 0, 0])
    info = mask.info(t, mask.penalty(t))
    assert info["truncated_frac"].tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(info["length_ratio"], [2 / 4, np.nan, 6 / 2])  # words / reference words
    # the learner's view: rows of several Rewards joined, a missing mask keeps every row
    parts = [Rewards(np.zeros(2), np.zeros(2), {}, loss_mask=np.array([1.0, 0.0], np.float32)),
             Rewards(np.zeros(1), np.zeros(1), {})]  # fmt: skip
    assert loss_rows(parts, 3).tolist() == [1.0, 0.0, 1.0]
    assert loss_rows(parts[1:], 1).tolist() == [1.0]


# ---------------------------------------------------------------- remote reward: a real server on 127.0.0.1


ONE_ROW = RewardBatch(["q"], ["a"], ["r"], [{}])


@pytest.fixture
def server(request):
    srv = ScoreServer(**getattr(request, "param", {}))
    yield srv
    srv.close()


@pytest.mark.parametrize("server", [{"fail_first": 2}], indirect=True)
def test_remote_reward_retries_then_scores(server):
    remote = RemoteReward(server.url, timeout_s=5, retries=2)
    scores = remote.score(RewardBatch(["q1", [{"role": "user", "content": "q2"}]], ["abc", "de"], ["x", None],
                                      [{"n": 1}, {}]))
    np.testing.assert_array_equal(scores, np.array([3.0, np.nan], np.float32))
    assert len(server.requests) == 3  # two 500s, then the answer
    assert server.requests[-1]["prompts"][1] == [{"role": "user", "content": "q2"}]
    assert server.requests[-1]["extras"] == [{"n": 1}, {}]


@pytest.mark.parametrize("server", [{"fail_first": 99}], indirect=True)
def test_remote_reward_fails_after_the_last_retry(server):
    with pytest.raises(RemoteRewardError, match=r"failed 2 time\(s\).*HTTP 500; HTTP 500"):
        RemoteReward(server.url, timeout_s=5, retries=1).score(ONE_ROW)
    assert len(server.requests) == 2


@pytest.mark.parametrize("server", [{"delay_s": 1.0}], indirect=True)
def test_remote_reward_timeout_and_dead_port_fail(server):
    with pytest.raises(RemoteRewardError, match=r"failed 1 time\(s\).*timed out"):
        RemoteReward(server.url, timeout_s=0.2, retries=0).score(ONE_ROW)
    dead = server.url.replace(str(server.httpd.server_address[1]), "9")  # the dead-end loopback port
    with pytest.raises(RemoteRewardError, match=r"URLError"):
        RemoteReward(dead, timeout_s=1, retries=0).score(ONE_ROW)


def test_remote_reward_headers_from_the_environment_and_a_response_size_cap(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SCORER_AUTH", "Bearer s3cret")
    remote = RemoteReward(server.url, timeout_s=5, retries=0, headers_env={"Authorization": "SCORER_AUTH"})
    np.testing.assert_array_equal(remote.score(ONE_ROW), [1.0])
    assert server.headers[-1]["Authorization"] == "Bearer s3cret"
    with pytest.raises(RemoteRewardError, match=r"larger than reward.remote.max_response_bytes=8"):
        RemoteReward(server.url, timeout_s=5, retries=0, max_response_bytes=8).score(ONE_ROW)  # {"scores": [1.0]}
    monkeypatch.delenv("SCORER_AUTH")
    with pytest.raises(RemoteRewardError, match="reward.remote.headers_env: SCORER_AUTH not set"):
        RemoteReward(server.url, timeout_s=5, retries=0, headers_env={"Authorization": "SCORER_AUTH"})
    # before Ray starts: an unset variable and retries that outlast the scorer's timeout are config errors
    remote_cfg = f"reward.remote={{url: '{server.url}', headers_env: {{Authorization: SCORER_AUTH}}}}"
    with pytest.raises(ConfigError, match="SCORER_AUTH not set"):
        prepare(load_config("tiny", [remote_cfg, f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"3 tries of timeout_s=50 do not fit in fault_tolerance.score_timeout_s=120"):
        load_config("tiny", [f"reward.remote={{url: '{server.url}', timeout_s: 50}}"])


# ---------------------------------------------------------------- inside the scorer


@pytest.fixture(scope="module")
def embedder():
    threads = torch.get_num_threads()
    yield Embedder("all-minilm-l6-v2", torch_threads=1)
    torch.set_num_threads(threads)


def make_scorer(embedder, monkeypatch, **overrides) -> RewardScorer:
    monkeypatch.setattr(components, "Embedder", lambda name, torch_threads, device: embedder)
    kwargs = dict(alpha=0.0, beta=0.0, bleu=0.0, rouge_l=0.0, freq_mode="mean", empty_reward=-1.0,
                  embedding_model="all-minilm-l6-v2", normalize="none", torch_threads=1, rm_weight=0.0,
                  rm_model=None, rm_batch_size=8)  # fmt: skip
    return RewardScorer(**(kwargs | overrides))


def test_scorer_weighs_user_functions_remote_and_length(embedder, monkeypatch, rewards_file, server):
    functions = [{"path": f"{rewards_file}:exact_match", "name": "em", "weight": 2.0},
                 {"path": f"{rewards_file}:by_difficulty", "name": "hard", "weight": 0.5}]  # fmt: skip
    remote = {"url": server.url, "timeout_s": 5, "retries": 0, "weight": 0.1}
    scorer = make_scorer(embedder, monkeypatch, functions=functions, remote=remote, overlong_penalty=1.0,
                         overlong_buffer=0.5, truncation="penalize", truncation_penalty=2.0)  # fmt: skip
    t = traj(["4", "five", "4 4"], ["4", "4", None], [2, 3, 4], [False, False, True], budget=4,
             extras=[{"difficulty": 1}, {"difficulty": 2}, {}])  # fmt: skip
    out = scorer.score(t)
    c = out.components
    np.testing.assert_array_equal(c["em"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(c["hard"], [1.0, 8.0, np.nan])  # len("five") * 2
    np.testing.assert_array_equal(c["remote"], [1.0, 4.0, np.nan])  # the server scores lengths
    # raw: 2 em + 0.5 hard + 0.1 remote (NaN counts 0) - length: budget 4, buffer 2 from 2 -> 0, 0.5, 1 (+2 cut)
    expected = np.array([2 + 0.5 + 0.1 - 0.0, 0 + 4 + 0.4 - 0.5, 0 - 3.0])
    np.testing.assert_allclose(out.raw_total, expected, rtol=1e-6)
    np.testing.assert_allclose(out.total, expected, rtol=1e-6)  # normalize=none
    np.testing.assert_allclose(out.info["length_penalty"], [0.0, 0.5, 3.0])

    normed = make_scorer(embedder, monkeypatch, functions=functions[:1], normalize="components")
    normed.score(t)
    assert normed.normalizers["em"].count == 2  # the not-applicable row stays out of the statistics
    with pytest.raises(ValueError, match=r"the name 'sim' is taken"):
        make_scorer(embedder, monkeypatch, functions=[{"path": "math_exact_match", "name": "sim", "weight": 1}])


def test_scorer_builds_the_components_the_config_names(embedder, monkeypatch, rewards_file, server):
    monkeypatch.setattr(components, "Embedder", lambda name, torch_threads, device: embedder)
    cfg = load_config("tiny", [
        "reward.alpha=0.25", "reward.bleu=0.5",
        f"reward.functions=[{{path: '{rewards_file}:exact_match', name: em, weight: 2}}, {{path: math_exact_match}}]",
        f"reward.remote={{url: '{server.url}', timeout_s: 3, retries: 1, weight: 0.1}}",
    ])  # fmt: skip
    scorer = RewardScorer(**actor_settings(cfg.reward))  # as the reward role is launched
    built = [(name, type(c).__name__, c.weight) for name, c in scorer.components.items()]
    assert built == [("freq", "Frequency", 0.25), ("sim", "Similarity", 1.0), ("bleu", "PairMetric", 0.5),
                     ("rouge_l", "PairMetric", 0.0), ("em", "UserFunction", 2.0),
                     ("math_exact_match", "UserFunction", 1.0), ("remote", "RemoteReward", 0.1)]  # fmt: skip
    assert set(scorer.components) - {"em", "math_exact_match"} <= RESERVED  # the built-ins' names are reserved
    assert scorer.components["em"].fn is load_function(f"{rewards_file}:exact_match")
    assert scorer.components["math_exact_match"].fn is math_exact_match
    remote = scorer.components["remote"]
    assert (remote.url, remote.timeout_s, remote.retries) == (server.url, 3, 1)
    assert scorer.state_dict().keys() == {*scorer.components, "total"}
    assert "rm" not in scorer.components  # rm_weight 0: no model loaded


@pytest.mark.parametrize("server", [{"fail_first": 99}], indirect=True)
def test_scorer_fails_the_batch_when_the_remote_fails(embedder, monkeypatch, server):
    scorer = make_scorer(embedder, monkeypatch, remote={"url": server.url, "timeout_s": 5, "retries": 1, "weight": 1})
    with pytest.raises(RemoteRewardError):
        scorer.score(traj(["a"], ["a"], [1], [False], budget=4))


# ---------------------------------------------------------------- config: before Ray, and tune


def test_config_names_resolves_paths_and_refuses_clashes(tmp_path, monkeypatch, rewards_file):
    monkeypatch.chdir(rewards_file.parent)
    functions = "[{path: 'my_rewards.py:exact_match'}, {path: math_exact_match, weight: 2}]"
    cfg = load_config("tiny", [f"reward.functions={functions}"])
    first, second = cfg.reward.functions
    assert first.path == f"{rewards_file}:exact_match" and first.name == "exact_match"  # absolute, named
    assert second.name == "math_exact_match" and second.weight == 2.0
    for value, message in [
        ("[{path: 'a.py:sim'}]", r"name 'sim' is taken"),
        ("[{path: math_exact_match}, {path: 'x.py:math_exact_match'}]", r"used twice"),
        ("[{path: math_exact_match, name: 'a-b'}]", r"identifier"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [f"reward.functions={value}"])
    with pytest.raises(ConfigError, match=r"reward.remote.url"):
        load_config("tiny", ["reward.remote={url: '127.0.0.1:80'}"])


def test_prepare_refuses_bad_functions_before_ray(tmp_path, rewards_file):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "#### 1", "difficulty": i}) + "\n"
                            for i in range(8)))  # fmt: skip
    base = ["policy.model=tiny-gpt2", f"data.train={data}", f"output_dir={tmp_path}/run"]
    fine = load_config("tiny", [*base, f"reward.functions=[{{path: '{rewards_file}:by_difficulty'}}]"])
    train_set, eval_set = prepare(fine)
    assert sorted(p.extra["difficulty"] for p in train_set + eval_set) == list(range(8))  # extras carried
    for path, message in [
        (f"{tmp_path}/nope.py:f", r"reward.functions\[0\] \(f\): .*not found"),
        (f"{rewards_file}:missing", r"has no function 'missing'"),
        (f"{rewards_file}:needs_unknown", r"required parameter 'secret'"),
    ]:
        cfg = load_config("tiny", [*base, f"reward.functions=[{{path: '{path}'}}]"])
        with pytest.raises(ConfigError, match=message):
            prepare(cfg)
    assert not ray.is_initialized()


def test_tune_searches_a_function_weight(tmp_path):
    spec = {
        "base": "tiny",
        "overrides": {"reward": {"functions": [{"path": "math_exact_match"},
                                               {"path": "math_exact_match", "name": "m2"}]}},
        "search": {"algorithm": "grid", "space": {"reward.functions.m2.weight": {"values": [0.0, 3.0]}},
                   "simplex": {"weights": ["reward.alpha", "reward.functions.math_exact_match.weight"],
                               "share": {"values": [0.25]}}},
    }  # fmt: skip
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    setup = load_tune_config(path)
    point = setup.cfg.search.field_values({"reward.functions.m2.weight": 3.0, "simplex_share_1": 0.25})
    cfg = setup.run_config(point)
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("math_exact_match", 0.75), ("m2", 3.0)]
    assert cfg.reward.alpha == 0.25
    spec["search"]["space"] = {"reward.functions.nope.weight": {"values": [1.0]}}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"no entry named 'nope'.*\['math_exact_match', 'm2'\]"):
        load_tune_config(path)


def test_nan_or_inf_from_a_function_or_a_server_fails_naming_it():
    """None says "does not apply"; a NaN would drop the component out of the reward and the logs unseen."""
    assert np.isnan(as_scores([1.0, None], 2, "f")[1])
    for bad in (float("nan"), np.float32("nan"), float("inf"), -np.inf):
        with pytest.raises(RewardFunctionError, match=r"reward function 'all_nan': row 1 is .*or None for a row"):
            as_scores([0.5, bad], 2, "reward function 'all_nan'")
    with pytest.raises(RewardFunctionError, match=r"remote reward http://x: row 0 is nan"):
        as_scores(json.loads("[NaN, 1.0]"), 2, "remote reward http://x")  # a server's JSON NaN literal
