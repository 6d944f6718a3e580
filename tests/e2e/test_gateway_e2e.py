"""Serve as the agent's gateway, end to end: the official `openai` client against one Serve app (the
tiny model, 127.0.0.1) for the whole module; log-probs checked against a forward pass in this process;
an episode recorded through POST /v1/episodes trains a step of `rayrlhf train`."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
import torch
from ray import serve
from safetensors.numpy import load_file
from sockets import free_port

from rayrlhf.actors.generation.tool_calls import format_tool_call, with_tools
from rayrlhf.actors.runtime.models import load_policy, resolve_policy
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.data.episodes import read_episodes
from rayrlhf.jobs.serve import build_app
from rayrlhf.jobs.train import train

MODEL = "tiny-gpt2"
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                           "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]  # fmt: skip
ARGS = {"expression": "2 + 3"}


@pytest.fixture(scope="module")
def gateway(local_ray, tmp_path_factory):
    episodes = tmp_path_factory.mktemp("gateway") / "episodes.jsonl"
    cfg = ServeConfig(model=MODEL, num_cpus=0.5, torch_threads=1, max_tokens=32, max_prompt_tokens=400,
                      auth_env=None, app_name="gateway", episodes_file=str(episodes))  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", http_client=http), episodes
    finally:
        http.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def local():
    return load_policy(resolve_policy(MODEL))


def logprobs_of(local, prompt: list[int], completion: list[int]) -> list[float]:
    """Each completion token's log-prob under the model (temperature 1), by one forward pass."""
    model, _ = local
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    scores = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return scores.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def test_the_openai_client_runs_a_tool_loop(gateway, local):
    client, _ = gateway
    messages = [{"role": "user", "content": "What is 2 + 3? Use the calculator."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=6, temperature=0)
    assert first.choices[0].finish_reason in ("stop", "length")  # the tiny model does not call tools by itself
    # the program's loop: the call (as a policy trained with tools would make it) and the tool's result go back
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "calc", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "5"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})  # fmt: skip
    _, tok = local
    rendered = tok.apply_chat_template(with_tools([
        messages[0], {"role": "assistant", "content": format_tool_call("calc", ARGS)}, {"role": "tool", "content": "5"},
    ], TOOLS), add_generation_prompt=True, tokenize=False)
    prompt = tok(rendered, add_special_tokens=False).input_ids
    assert reply.model_extra["prompt_token_ids"] == prompt
    ids = reply.choices[0].model_extra["token_ids"]
    model, _ = local
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=len(ids), do_sample=False)[0, len(prompt):]
    assert ids == greedy.tolist()
    assert reply.usage.prompt_tokens == len(prompt)

    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=6, temperature=0,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_logprobs_equal_a_forward_pass_and_token_ids_round_trip(gateway, local):
    client, _ = gateway
    _, tok = local
    prompt = tok("What is 2 plus 3?").input_ids
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, logprobs=0,
                                    extra_body={"return_token_ids": True})  # fmt: skip
    choice = out.choices[0]
    assert choice.model_extra["prompt_token_ids"] == prompt
    ids = choice.model_extra["token_ids"]
    assert len(ids) == len(choice.logprobs.token_logprobs) == out.usage.completion_tokens
    np.testing.assert_allclose(choice.logprobs.token_logprobs, logprobs_of(local, prompt, ids), atol=1e-4)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, extra_body={"return_token_ids": True})  # fmt: skip
    ids = chat.choices[0].model_extra["token_ids"]
    got = [t.logprob for t in chat.choices[0].logprobs.content]
    np.testing.assert_allclose(got, logprobs_of(local, chat.model_extra["prompt_token_ids"], ids), atol=1e-4)

    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=7,
                                         logprobs=0, stream=True, extra_body={"return_token_ids": True})  # fmt: skip
    chunks = list(streamed)
    assert [i for c in chunks for i in c.choices[0].model_extra["token_ids"]] == choice.model_extra["token_ids"]
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == choice.logprobs.token_logprobs


def changed_fraction(final_dir) -> float:
    start = load_file(str(resolve_policy(MODEL) / "model.safetensors"))
    end = load_file(str(final_dir / "model.safetensors"))
    return float(np.mean([not np.array_equal(start[k], end[k]) for k in start]))


def test_an_episode_recorded_through_the_gateway_trains(gateway, local, tmp_path):
    client, path = gateway
    _, tok = local
    tool_turn = tok("\ncalc says 5\n").input_ids

    def episode(reward: float, seed: int) -> dict:
        """Two turns, token in token out: the second prompt is the first's ids, its answer's, and the tool's."""
        prompt = tok("What is 2 plus 3?").input_ids
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, seed=seed, logprobs=0,
                                          extra_body={"return_token_ids": True})  # fmt: skip
        follow = prompt + first.choices[0].model_extra["token_ids"] + tool_turn
        second = client.completions.create(model=MODEL, prompt=follow, max_tokens=4, seed=seed, logprobs=0)
        posted = client.post("/episodes", cast_to=httpx.Response, body={"requests": [first.id, second.id], "reward": reward})
        assert posted.status_code == 200
        return posted.json()

    good, bad = episode(1.0, 1), episode(0.0, 2)
    assert good["loss_mask"].count(0) == len(tool_turn) and good["reward"] == 1.0
    assert [e.reward for e in read_episodes(path)] == [1.0, 0.0]  # the replica wrote them
    with pytest.raises(openai.NotFoundError):
        client.post("/episodes", cast_to=httpx.Response, body={"requests": ["cmpl-unknown"], "reward": 1.0})
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"data.episodes={path}", "steps=1",
                               "prompts_per_step=1", "rollout.samples_per_prompt=2", "data.num_eval=2"])  # fmt: skip
    result = train(cfg)
    (step,) = result.history
    assert step["reward/total"] == 0.5 and step["samples/trained"] == 2.0
    assert np.isfinite(step["pipeline/mismatch_kl"]) and step["pipeline/mismatch_kl"] < 1e-3  # same weights sampled
    assert changed_fraction(result.final_dir) > 0.5
