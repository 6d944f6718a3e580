"""The agent gateway without a server: tool calls in responses and streams, log-prob and token-id
fields, tools in the prompt, and the recorded-episode file (the HTTP path: tests/e2e/test_gateway_e2e.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from rayrlhf.actors.generation.requests import ChoiceDelta, GenerationRequest, SamplingParams, Update
from rayrlhf.actors.generation.tool_calls import describe_tools, format_tool_call
from rayrlhf.actors.serving.openai_output import shown_end, tool_reply
from rayrlhf.actors.serving.openai_requests import Job, Limits, OpenAIEngine
from rayrlhf.actors.serving.openai_schema import ChatCompletionRequest, OpenAIError, parse_request
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.data.episodes import Episode, append_episode, from_turns, read_episodes, step_episodes, trajectory
from rayrlhf.jobs.train import check_episodes

CALL = format_tool_call("calc", {"expression": "3 * 4"})
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                           "parameters": {"type": "object"}}}]  # fmt: skip


def job(kind: str = "chat", rows: int = 1, **options) -> Job:
    params = SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0, stop=(), seed=None)
    generation = GenerationRequest([[5, 6, 7]], rows, params, deadline=1e12, logprobs=True)
    return Job(kind=kind, id="chatcmpl-abc", created=1, model="m", stream=False, include_usage=False,
               timeout_s=1.0, generation=generation, token_text=lambda t: f"<{t}>", **options)  # fmt: skip


def update(*choices: ChoiceDelta, done: bool = False) -> Update:
    return Update(list(choices), prompt_tokens=3, completion_tokens=1, done=done, batch_requests=1, batch_rows=1)


def test_shown_end_holds_back_from_a_call_opening():
    assert shown_end("Sure.") == 5
    assert shown_end("Sure.<tool") == 5  # may become a call
    assert shown_end("Sure.<tool_call>{") == 5
    assert shown_end("a < b") == 5  # a "<" followed by something else is text
    assert shown_end("x<") == 1


def test_tool_reply_returns_calls_or_the_text_as_written():
    content, calls = tool_reply(f"Let me compute. {CALL}", "call_x")
    assert content == "Let me compute."
    assert calls == [{"id": "call_x_0", "type": "function",
                      "function": {"name": "calc", "arguments": '{"expression":"3 * 4"}'}}]  # fmt: skip
    bad = f"{CALL}<tool_call>{{not json</tool_call>"
    assert tool_reply(bad, "c") == (bad, [])  # one malformed block: all of it is plain content
    assert tool_reply("no call", "c") == ("no call", [])


def test_a_tool_call_in_a_response_parses_with_the_openai_client():
    j = job(tools=True, logprobs=True, token_ids=True)
    j.add(update(ChoiceDelta(0, "Let me compute. " + CALL, "stop", [9, 10], [-0.5, -0.25]), done=True))
    body = j.response()
    reply = ChatCompletion.model_validate(body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("calc", {"expression": "3 * 4"})
    assert [(t.token, t.logprob) for t in choice.logprobs.content] == [("<9>", -0.5), ("<10>", -0.25)]
    assert body["prompt_token_ids"] == [5, 6, 7] and body["choices"][0]["token_ids"] == [9, 10]

    malformed = job(tools=True)
    malformed.add(update(ChoiceDelta(0, "<tool_call>{oops</tool_call>", "stop"), done=True))
    choice = ChatCompletion.model_validate(malformed.response()).choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == (
        "stop", "<tool_call>{oops</tool_call>", None)


def test_a_stream_never_shows_half_a_call_and_ends_with_tool_calls_chunks():
    j = job(tools=True, token_ids=True)
    pieces = ["Sure", ". <tool", '_call>{"name": "calc", ', '"arguments": {"expression": "3 * 4"}}', "</tool_call>"]
    events = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        events += j.chunks(update(ChoiceDelta(0, piece, "stop" if last else None, [k], [-1.0]), done=last))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    shown = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert shown == "Sure. "  # nothing of the block ever reached the client as text
    assert chunks[0].choices[0].delta.role == "assistant" and events[0]["prompt_token_ids"] == [5, 6, 7]
    assert [e["choices"][0]["token_ids"] for e in events] == [[0], [1], [2], [3], [4]]
    final = chunks[-1].choices[0]
    assert final.finish_reason == "tool_calls"
    (call,) = final.delta.tool_calls
    assert (call.index, call.id, call.function.name) == (0, "call_abc_0_0", "calc")
    assert json.loads(call.function.arguments) == {"expression": "3 * 4"}

    plain = job(tools=True)  # a "<" that turns out not to open a call is shown once it is clear
    events = plain.chunks(update(ChoiceDelta(0, "1 <", None))) + plain.chunks(update(ChoiceDelta(0, " 2", "stop")))
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["1 ", "< 2"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_logprobs_and_token_ids_in_the_legacy_shape():
    j = job("completion", logprobs=True, token_ids=True)
    events = j.chunks(update(ChoiceDelta(0, "ab", None, [1, 2], [-1.0, -2.0])))
    assert events[0]["choices"][0]["logprobs"]["text_offset"] == [0, 3]  # "<1>" is 3 characters
    j.add(update(ChoiceDelta(0, "c", "length", [3], [-3.0]), done=True))
    reply = Completion.model_validate(j.response())
    assert reply.choices[0].logprobs.token_logprobs == [-1.0, -2.0, -3.0]
    assert reply.choices[0].logprobs.tokens == ["<1>", "<2>", "<3>"]
    body = j.response()["choices"][0]
    assert body["prompt_token_ids"] == [5, 6, 7] and body["token_ids"] == [1, 2, 3]
    assert j.record() == [{"prompt_ids": [5, 6, 7], "completion_ids": [1, 2, 3], "logprobs": [-1.0, -2.0, -3.0]}]


@pytest.fixture(scope="module")
def engine(gen) -> OpenAIEngine:
    limits = Limits(default_max_tokens=4, max_tokens=32, max_prompt_tokens=400, max_rows=4, request_timeout_s=30)
    return OpenAIEngine(gen, "tiny-gpt2", limits)


def parse(engine: OpenAIEngine, kind: str, **body) -> Job:
    return engine.parse(kind, json.dumps({"model": "tiny-gpt2", **body}).encode())


def test_tools_and_a_tool_history_render_in_the_text_convention(engine, gen):
    history = [
        {"role": "user", "content": "3 times 4?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "3 * 4"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12"},
    ]
    j = parse(engine, "chat", messages=history, tools=TOOLS)
    assert not gen.template_has_tools and j.tools
    expected = gen.tokenizer.apply_chat_template([
        {"role": "system", "content": describe_tools(TOOLS)}, history[0],
        {"role": "assistant", "content": CALL}, {"role": "tool", "content": "12"},
    ], add_generation_prompt=True, tokenize=False)
    assert j.generation.prompts == [gen.tokenizer(expected, add_special_tokens=False).input_ids]
    assert not parse(engine, "chat", messages=history, tools=TOOLS, tool_choice="none").tools


def test_token_id_prompts_and_refusals(engine):
    j = parse(engine, "completion", prompt=[[1, 2, 3], [4]], logprobs=0, return_token_ids=True)
    assert j.generation.prompts == [[1, 2, 3], [4]] and j.generation.logprobs and j.logprobs and j.token_ids
    assert parse(engine, "completion", prompt="hi", return_token_ids=True).generation.logprobs  # ids need the records
    assert not parse(engine, "chat", messages=[{"role": "user", "content": "x"}], logprobs=False).generation.logprobs
    for kind, body, param in [
        ("completion", {"prompt": [engine.vocab_size]}, "prompt"),
        ("completion", {"prompt": "x", "logprobs": 5}, "logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ("chat", {"messages": [{"role": "tool", "content": "12"}]}, "messages[0]"),
        ("completion", {"prompt": "x", "logprobs": 0, "num_beams": 2}, "num_beams"),
    ]:
        with pytest.raises(OpenAIError) as err:
            parse(engine, kind, **body)
        assert (err.value.status, err.value.param) == (400, param), body


# --- recorded episodes -------------------------------------------------------------------------


def test_an_episode_from_turns_keeps_every_token_and_masks_the_programs():
    turns = [{"prompt_ids": [1, 2], "completion_ids": [3, 4], "logprobs": [-0.1, -0.2]},
             {"prompt_ids": [1, 2, 3, 4, 7, 8], "completion_ids": [5], "logprobs": [-0.3]}]  # fmt: skip
    ep = from_turns(turns, 1.5, 3, ["a", "b"])
    assert ep == Episode([1, 2], [3, 4, 7, 8, 5], [-0.1, -0.2, 0.0, 0.0, -0.3], [1, 1, 0, 0, 1], 3, 1.5, ["a", "b"])
    retokenised = [turns[0], {**turns[1], "prompt_ids": [1, 2, 9, 7, 8]}]
    with pytest.raises(ValueError, match="does not start with the tokens of a"):
        from_turns(retokenised, 1.0, 0, ["a", "b"])


def test_episode_files_round_trip_and_name_the_bad_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    good = Episode([1], [2, 3], [-0.5, 0.0], [1, 0], 0, 1.0)
    append_episode(path, good)
    append_episode(path, Episode([4, 5], [6], [-1.0], [1], 2, -1.0, ["r"]))
    assert read_episodes(path)[0] == good and len(read_episodes(path)) == 2
    with open(path, "a") as f:
        f.write(json.dumps({**good.__dict__, "logprobs": [0.5, 0.0]}) + "\n")
    with pytest.raises(ValueError, match=r"episodes.jsonl, line 3: logprobs must be finite numbers <= 0"):
        read_episodes(path)
    path.write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_episodes(path)


def test_episodes_become_a_trajectory_with_groups_and_recorded_logprobs():
    a = Episode([1, 2], [3, 4, 5], [-0.1, -9.0, -0.3], [1, 0, 1], 0, 1.0)
    b = Episode([6], [7], [-0.7], [1], 0, 0.0)
    assert step_episodes([a, b], 1, 3) == [b, a, b]  # in order, again from the start
    traj, rewards = trajectory([a, b], 2, version=4, first_group=10)
    np.testing.assert_array_equal(traj.input_ids, [[1, 2, 3, 4, 5], [0, 6, 7, 0, 0]])
    np.testing.assert_array_equal(traj.attention_mask, [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(traj.response_mask, [[0, 0, 1, 0, 1], [0, 0, 1, 0, 0]])
    np.testing.assert_allclose(traj.old_logprobs, [[0, 0, -0.1, 0, -0.3], [0, 0, -0.7, 0, 0]])
    assert traj.group_ids.tolist() == [10, 10] and traj.sample_ids.tolist() == [20, 21] and traj.policy_version == 4
    assert rewards.total.tolist() == [1.0, 0.0] and rewards.raw_total.tolist() == [1.0, 0.0]


def test_train_checks_the_episodes_file_before_ray_starts(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1], "completion_ids": [2], "logprobs": [-1.0], "loss_mask": [0],
                                "policy_version": 0, "reward": 1.0}) + "\n")  # fmt: skip
    cfg = load_config("tiny", [f"data.episodes={path}"])
    with pytest.raises(ConfigError, match=r"data.episodes: .*line 1: loss_mask must be 0/1 with at least one 1"):
        check_episodes(cfg, str(path))
    append_episode(path.with_name("good.jsonl"), Episode([1], [2], [-1.0], [1], 0, 1.0))
    with pytest.raises(ConfigError, match="pipeline.max_staleness: 0"):
        check_episodes(load_config("tiny", ["pipeline.max_staleness=1"]), str(path.with_name("good.jsonl")))


def test_message_content_is_required_unless_the_message_makes_calls():
    call = {"id": "c", "type": "function", "function": {"name": "calc", "arguments": "{}"}}
    for message, ok in [({"role": "user"}, False), ({"role": "assistant", "tool_calls": [call]}, True),
                        ({"role": "assistant", "content": None}, False)]:  # fmt: skip
        body = json.dumps({"model": "m", "messages": [message]}).encode()
        if ok:
            assert parse_request(body, ChatCompletionRequest).messages[0].content is None
        else:
            with pytest.raises(OpenAIError, match="content"):
                parse_request(body, ChatCompletionRequest)
