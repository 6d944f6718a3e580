"""Multi-turn environments without Ray: the safe calculator, the built-ins, loading checks, and a
scripted episode through a real RolloutWorker whose token sequence, masks, log-probs and rewards are
checked against ids computed by hand from the tokenizer (token in, token out)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rayrlhf.actors.environment_worker import EnvironmentWorker
from rayrlhf.actors.environments.base import EnvironmentLoadError, load_environment
from rayrlhf.actors.environments.calculator import EXAMPLE, Calculator, CalculatorError, calculate
from rayrlhf.actors.environments.episode import Episode, MessageRenderer, Turn, assistant_message, to_trajectory
from rayrlhf.actors.environments.guess_number import EXAMPLE as GUESS_EXAMPLE
from rayrlhf.actors.environments.guess_number import GuessNumber
from rayrlhf.actors.generation.tool_calls import format_tool_call, parse_tool_calls
from rayrlhf.actors.rl.aggregation import token_mean
from rayrlhf.actors.rl.losses import ppo_clip
from rayrlhf.actors.rl.trajectory import Prompt
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.jobs.config.run import AlgorithmConfig
from scripted_env import Scripted

SCRIPTED = f"{Path(__file__).parents[1] / 'scripted_env.py'}:Scripted"


def test_the_calculator_evaluates_arithmetic_exactly_and_runs_no_code():
    assert calculate("3 * (4 + 5)") == "27"
    assert calculate("7 / 2") == "3.5" and calculate("-2 ** 3") == "-8" and calculate("0.1 + 0.2") == "0.3"
    for bad, why in [("__import__('os').system('true')", "only numbers"), ("x + 1", "only numbers"),
                     ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "exponents"), ("2 +", "not an arithmetic"),
                     ("1" * 300, "longer than")]:  # fmt: skip
        with pytest.raises(CalculatorError, match=why):
            calculate(bad)


def test_calculator_episode_tool_results_then_exact_match_reward():
    env = Calculator()
    first = env.reset({"prompt": "Sam has 3 bags of 4 apples. How many?", "reference": "3 * 4 = 12\n#### 12"}, seed=0)
    assert first[0]["role"] == "system" and "calculator" in first[0]["content"] and first[1:-1] == EXAMPLE
    assert first[-1]["role"] == "user" and first[-1]["content"].startswith("Sam has 3 bags")
    assert parse_tool_calls(EXAMPLE[1]["content"]).calls[0].parsed_arguments() == {"expression": "3 * 4"}
    assert calculate("3 * 4") == EXAMPLE[2]["content"]
    call = format_tool_call("calculator", {"expression": "3 * 4"})
    reply = "Let me compute. " + call + "<tool_call>{oops</tool_call>"
    message, calls, invalid = assistant_message(reply)
    assert (calls, invalid) == (1, 1)
    messages, reward, done = env.step(message)
    not_json = "invalid tool call: not JSON (Expecting property name enclosed in double quotes at character 1)"
    assert [m["content"] for m in messages] == [not_json, "12"]
    assert (reward, done) == (0.0, False)
    assert env.step(assistant_message("The answer is 12.")[0])[1:] == (1.0, True)
    assert env.step(assistant_message("The answer is 13.")[0])[1:] == (0.0, True)


def test_calculator_call_reward_is_paid_once_for_a_call_that_returns_a_number():
    env = Calculator(call_reward=0.1)
    env.reset({"prompt": "Sam has 3 bags of 4 apples. How many?", "reference": "#### 12"}, seed=0)
    bad = assistant_message(format_tool_call("calculator", {"expression": "import os"}))[0]
    good = assistant_message(format_tool_call("calculator", {"expression": "3 * 4"}))[0]
    assert env.step(bad)[1] == 0.0  # an error earns nothing
    assert env.step(good)[1:] == (0.1, False)
    assert env.step(good)[1:] == (0.0, False)  # once per episode
    assert env.step(assistant_message("The answer is 13.")[0])[1:] == (0.0, True)
    for wrong in (1.0, -0.1):
        with pytest.raises(ValueError, match="call_reward must be in"):
            Calculator(call_reward=wrong)


def test_an_episode_is_cut_by_a_token_cap_not_by_running_out_of_turns():
    def played(*ended: bool, room: bool = True) -> tuple[float, bool]:
        episode = Episode(Prompt(0, "q", "r"), sample=0, seed=0)
        for e in ended:
            episode.add_turn(Turn([1], [2], [-0.5], "x", e))
        if not room:
            episode.add_turn(Turn([3], [], [], "", False))
        return episode.fields()["env_cut"], episode.over

    assert played(True, True) == (0.0, False)  # out of turns next: the driver ends it, not a token cap
    assert played(True, False) == (1.0, True)  # a reply without its EOS
    assert played(True, room=False) == (1.0, True)  # env.max_tokens used up


def test_guess_number_is_a_function_of_its_seed_and_hints_the_way():
    secrets = set()
    for seed in range(20):
        env = GuessNumber()
        env.reset({"low": 1, "high": 8}, seed)
        secrets.add(env.secret)
        again = GuessNumber()
        again.reset({"low": 1, "high": 8}, seed)
        assert again.secret == env.secret
    assert secrets <= set(range(1, 9)) and len(secrets) > 3
    env = GuessNumber()
    first = env.reset({"low": 1, "high": 20}, 7)
    rules = "a whole number from 1 to 20. Guess it: reply with one number. After each guess I say higher or lower."
    assert first[:-1] == GUESS_EXAMPLE and first[-1]["content"].endswith(rules)
    low, high = env.step({"content": "0"}), env.step({"content": "21"})
    assert low == ([{"role": "user", "content": "Higher."}], 0.0, False)
    assert high == ([{"role": "user", "content": "Lower."}], 0.0, False)
    assert env.step({"content": "no idea"})[2] is False
    assert env.step({"content": f"It is {env.secret}"}) == ([], 1.0, True)


def test_environment_paths_are_checked_with_a_message_naming_env_path(tmp_path):
    (tmp_path / "envs.py").write_text("class NoStep:\n    def reset(self, row, seed): return []\nfunction = len\n")
    for path, why in [(f"{tmp_path}/missing.py:X", "not found"), (f"{tmp_path}/envs.py:Nope", "has no class 'Nope'"),
                      (f"{tmp_path}/envs.py:NoStep", "no method step"), (f"{tmp_path}/envs.py:function", "not a class"),
                      ("nonsense", "built-in: calculator, guess_number")]:  # fmt: skip
        with pytest.raises(EnvironmentLoadError, match=f"env.path: .*{why}"):
            load_environment(path)
    (tmp_path / "picky.py").write_text("class Picky:\n    def __init__(self, level=1):\n        if level > 3: raise "
                                       "ValueError('level must be at most 3')\n    reset = step = print\n")
    for path, options, why in [
        (SCRIPTED, {"tool_rewrd": 0.5}, "Scripted.*unexpected keyword argument 'tool_rewrd'"),
        (f"{tmp_path}/picky.py:Picky", {"level": 4}, "Picky.*level must be at most 3"),
    ]:
        with pytest.raises(EnvironmentLoadError, match=f"env.options: {why}"):
            load_environment(path, options)
    worker = EnvironmentWorker(path=SCRIPTED, options={"tool_reward": 0.5})  # each episode built with them
    worker.reset([(0, 0)], [{"prompt": "p", "reference": None}], [0])
    assert worker.step([(0, 0)], ["7?"])[0][1:3] == (0.5, False)


def test_a_scripted_episode_holds_exactly_the_sampled_ids_and_masks_the_environments(tiny_dir):
    worker = RolloutWorker(model="tiny-gpt2", max_prompt_tokens=64, use_chat_template=True, system_prompt=None,
                           samples_per_prompt=1, max_new_tokens=8, temperature=1.0, top_p=1.0, torch_threads=1,
                           seed=3)  # fmt: skip
    tok = worker.tokenizer
    worker.eos_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "!")]  # a random model: end early
    env, episode = Scripted(), Episode(Prompt(id=4, text="unused"), sample=0, seed=11)
    first = env.reset(episode.row(), episode.seed)
    t1 = worker.turn([None], [first], [48], 8)[0]
    episode.add_turn(t1)
    new, reward, done = env.step(assistant_message(t1.text)[0])
    episode.rewards.append(reward)
    t2 = worker.turn([episode.prompt_ids + episode.ids], [new], [48 - len(episode.ids)], 8)[0]
    episode.add_turn(t2)
    episode.rewards.append(env.step(assistant_message(t2.text)[0])[1])
    episode.done = True

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    # by hand: ChatML renders the prompt; after a sampled <|im_end|>, its newline, the tool turn, the generation prompt
    prompt = ids("<|im_start|>user\nSay a number.<|im_end|>\n<|im_start|>assistant\n")
    tool = ids("\n") + ids("<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n")
    assert t1.observation == prompt and t2.observation == tool
    assert MessageRenderer(tok, worker.eos_ids).delta(new) == tool
    assert len(t1.tokens) >= 1 and len(t2.tokens) >= 1
    traj = to_trajectory([episode], 1, 0, worker.pad_id, 48)
    row = traj.input_ids[0][traj.attention_mask[0] == 1].tolist()
    assert row == prompt + t1.tokens + tool + t2.tokens  # the sampled ids themselves, never re-tokenised text
    start = len(prompt)
    mask = traj.response_mask[0][traj.attention_mask[0] == 1]
    expected = [0.0] * len(prompt) + [1.0] * len(t1.tokens) + [0.0] * len(tool) + [1.0] * len(t2.tokens)
    assert mask.tolist() == expected
    logprobs = traj.old_logprobs[0][traj.attention_mask[0] == 1]
    assert np.allclose(logprobs[start:start + len(t1.tokens)], t1.logprobs)
    assert np.allclose(logprobs[-len(t2.tokens):], t2.logprobs) and (logprobs[np.array(expected) == 0] == 0).all()
    assert traj.extras[0] == {"env_reward": 1.25, "env_success": 1.0, "env_turns": 2.0, "env_tool_calls": 0.0,
                              "env_invalid_calls": 0.0, "env_cut": float(not t2.ended)}  # fmt: skip
    assert traj.responses == [t2.text] and not traj.truncated[0]

    # the environment's ids carry no loss: the policy loss's gradient is zero on them
    logp = torch.tensor(traj.old_logprobs, requires_grad=True)
    response_mask = torch.tensor(traj.response_mask)
    per_token, _ = ppo_clip(logp, torch.tensor(traj.old_logprobs) - 0.1, torch.ones_like(logp), response_mask,
                            AlgorithmConfig())  # fmt: skip
    total, _ = token_mean(per_token, response_mask, AlgorithmConfig())
    total.backward()
    grad = logp.grad[0][traj.attention_mask[0] == 1]
    assert (grad[np.array(expected) == 0] == 0).all() and (grad[np.array(expected) == 1] != 0).all()
