"""The serving logic without a server: request parsing, the batched decode loop, responses, config."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.serve.schema import ServeDeploySchema

from rayrlhf.actors.batch_scheduler import DecodeScheduler
from rayrlhf.actors.models import load_policy, resolve_policy
from rayrlhf.actors.openai_engine import Job, Limits, OpenAIEngine
from rayrlhf.actors.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    parse_request,
)
from rayrlhf.actors.text_generator import (
    ChoiceDelta,
    GenerationError,
    GenerationRequest,
    SamplingParams,
    TextGenerator,
    Update,
    find_stop,
    held_back,
    sample_tokens,
)
from rayrlhf.jobs.cli import main as cli_main
from rayrlhf.jobs.config.base import CONFIG_DIR, ConfigError, load_yaml
from rayrlhf.jobs.config.serve import IMPORT_PATH, ServeConfig, load_serve_config
from rayrlhf.jobs.serve import app_builder

PROMPTS = ["What is 2 plus 3?", "Hello there, how many items are in the big box today?"]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_policy("tiny-gpt2")


@pytest.fixture(scope="module")
def gen(tiny_dir) -> TextGenerator:
    return TextGenerator(tiny_dir, "float32", torch_threads=1)


@pytest.fixture(scope="module")
def engine(gen) -> OpenAIEngine:
    limits = Limits(default_max_tokens=4, max_tokens=32, max_prompt_tokens=40, max_rows=4, request_timeout_s=30)
    return OpenAIEngine(gen, "tiny-gpt2", limits)


def params(max_tokens: int, temperature: float = 0.0, stop: tuple[str, ...] = (), seed: int | None = None):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, stop=stop, seed=seed)


def request(ids: list[int], p: SamplingParams, n: int = 1, timeout: float = 60.0) -> GenerationRequest:
    return GenerationRequest([ids], n, p, time.monotonic() + timeout)


def run(gen: TextGenerator, requests: list[GenerationRequest]) -> tuple[list[dict[int, str]], list[list]]:
    """Texts per request and choice, and every step's raw output."""
    texts: list[dict[int, str]] = [{} for _ in requests]
    steps = []
    for updates in gen.stream(requests):
        steps.append(updates)
        for r, u in enumerate(updates):
            for c in u.choices if u else []:
                texts[r][c.index] = texts[r].get(c.index, "") + c.text
    return texts, steps


def hf_greedy(tiny_dir, ids: list[int], n: int, eos: list[int]) -> str:
    model, tok = load_policy(tiny_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


# --- pure helpers ---------------------------------------------------------------------------


def test_stop_helpers():
    assert find_stop("abc END def STOP", ("STOP", "END")) == 4  # the earliest of the two
    assert find_stop("abc END", ("END",), start=5) is None
    assert find_stop("abc", ()) is None
    assert held_back("hello EN", ("END",)) == 2  # "EN" may still become "END"
    assert held_back("hello E", ("END", "Eve")) == 1
    assert held_back("hello", ("END",)) == 0
    assert held_back("xx##", ("###",)) == 2  # proper prefixes only: a full match is find_stop's job


def test_sample_tokens_greedy_and_top_p():
    # probabilities 0.5, 0.3, 0.2: top_p=0.6 keeps tokens 0 and 1 (mass before token 2 is 0.8 >= 0.6)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    seen: set[int] = set()
    for _ in range(200):
        out = sample_tokens(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.6, 0.0]), gens).tolist()
        assert out[0] == 0 and out[2] == 0  # greedy row; top_p=0 keeps only the top token
        seen.add(out[1])
    assert seen == {0, 1}


# --- the decode loop --------------------------------------------------------------------------


def test_batched_greedy_matches_hf_generate(gen, tiny_dir):
    ids = [gen.encode_text(p) for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])  # different lengths: left padding is exercised
    texts, steps = run(gen, [request(ids[0], params(3)), request(ids[1], params(7))])
    assert texts[0][0] == hf_greedy(tiny_dir, ids[0], 3, gen.eos_ids)
    assert texts[1][0] == hf_greedy(tiny_dir, ids[1], 7, gen.eos_ids)
    assert len(steps) == 7
    last_short = steps[2][0]
    assert last_short.done and last_short.completion_tokens == 3 and last_short.choices[-1].finish_reason == "length"
    assert [s[0] for s in steps[3:]] == [None] * 4  # the short request left the batch
    final = steps[-1][1]
    assert final.done and final.completion_tokens == 7 and final.prompt_tokens == len(ids[1])
    assert (final.batch_requests, final.batch_rows) == (2, 2)


def test_stop_string_truncates_and_never_streams_the_stop(gen):
    ids = gen.encode_text(PROMPTS[1])
    full = run(gen, [request(ids, params(12))])[0][0][0]
    stop = full[5:8]
    cut = full.find(stop)
    texts, steps = run(gen, [request(ids, params(12, stop=(stop,)))])
    assert texts[0][0] == full[:cut]
    deltas = [c for s in steps for c in s[0].choices] if steps else []
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in deltas)
    assert steps[-1][0].completion_tokens < 12


def test_eos_ends_with_stop_and_is_counted(gen):
    ids = gen.encode_text(PROMPTS[0])
    first_token = gen.tokenizer(run(gen, [request(ids, params(1))])[0][0][0]).input_ids[0]
    saved = gen.eos_ids
    gen.eos_ids = [first_token]  # the greedy first token now ends the answer
    try:
        texts, steps = run(gen, [request(ids, params(5))])
    finally:
        gen.eos_ids = saved
    assert texts[0][0] == "" and len(steps) == 1
    assert steps[0][0].choices[0].finish_reason == "stop" and steps[0][0].completion_tokens == 1


def test_seeded_sampling_is_reproducible_alone_and_batched(gen):
    ids = gen.encode_text(PROMPTS[0])
    p = params(8, temperature=1.0, seed=7)
    alone = run(gen, [request(ids, p, n=2)])[0][0]
    batched = run(gen, [request(gen.encode_text(PROMPTS[1]), params(3)), request(ids, p, n=2)])[0][1]
    assert alone == batched and alone[0] != alone[1]  # the n choices draw from different streams
    other = run(gen, [request(ids, params(8, temperature=1.0, seed=8), n=1)])[0][0]
    assert other[0] != alone[0]


def test_deadline_and_cancel_end_rows_without_a_step(gen):
    ids = gen.encode_text(PROMPTS[0])
    late = request(ids, params(5), timeout=-1.0)
    gone = request(ids, params(5))
    gone.cancelled = True
    ok = request(ids, params(2))
    texts, steps = run(gen, [late, gone, ok])
    first = steps[0]
    assert [c.finish_reason for c in first[0].choices] == ["timeout"] and first[0].completion_tokens == 0
    assert [c.finish_reason for c in first[1].choices] == ["cancelled"]
    assert first[2].choices == [] and not first[2].done  # the expiry step runs no model
    assert len(steps) == 3 and steps[-1][2].done and texts[2][0]


def test_non_finite_weights_raise_generation_error(tiny_dir):
    broken = TextGenerator(tiny_dir, "float32", torch_threads=1)
    with torch.no_grad():
        broken.model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(GenerationError, match="non-finite"):
        run(broken, [request(broken.encode_text("hi"), params(3, temperature=1.0))])


def test_scheduler_merges_the_groups_that_waited_for_the_model(gen):
    ids = gen.encode_text(PROMPTS[0])
    scheduler = DecodeScheduler(gen.stream, max_rows=3)

    async def consume(requests) -> set[tuple[int, int]]:
        """(batch id, requests in that batch) of every step's updates."""
        seen = set()
        async for updates in scheduler.run(requests):
            seen |= {(u[0], u[1].batch_requests) for u in updates if u is not None}
        return seen

    async def main():
        first = asyncio.create_task(consume([request(ids, params(12))]))
        while scheduler.stats.batches == 0:  # wait until the first batch is decoding
            await asyncio.sleep(0.001)
        waiting = [asyncio.create_task(consume([request(ids, params(2))])) for _ in range(4)]
        return await first, await asyncio.gather(*waiting)

    first, waiting = asyncio.run(main())
    assert first == {(1, 1)}
    # the four groups that queued meanwhile: the next batch takes them in order up to max_rows=3
    # sequences (1 + 1 + 1), the fourth decodes after it
    assert waiting == [{(2, 3)}, {(2, 3)}, {(2, 3)}, {(3, 1)}]
    assert scheduler.stats.as_dict() == {"batches": 3, "requests": 5, "sequences": 5,
                                         "batch_sizes": {"1": 2, "3": 1}}


def test_scheduler_fails_the_batch_not_itself(tiny_dir):
    broken = TextGenerator(tiny_dir, "float32", torch_threads=1)
    with torch.no_grad():
        broken.model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    scheduler = DecodeScheduler(broken.stream, max_rows=2)

    async def main() -> int:
        failures = 0
        for _ in range(2):  # the scheduler's loop survives a failed batch
            with pytest.raises(GenerationError):
                async for _ in scheduler.run([request(broken.encode_text("hi"), params(2))]):
                    pass
            failures += 1
        return failures

    assert asyncio.run(main()) == 2 and scheduler.stats.batches == 2


# --- OpenAI requests and responses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"prompt": "hi"}', "model"),
        (b'{"model": "m", "prompt": ""}', "prompt"),
        (b'{"model": "m", "prompt": ["a", ""]}', "prompt"),
        (b'{"model": "m", "prompt": [1, 2]}', "prompt"),
        (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', "temperature"),
        (b'{"model": "m", "prompt": "hi", "temperature": 2.5}', "temperature"),
        (b'{"model": "m", "prompt": "hi", "n": 1.5}', "n"),
        (b'{"model": "m", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "prompt": "hi", "stream": "yes"}', "stream"),
        (b'{"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"model": "m", "prompt": "hi", "max_tokenz": 3}', "max_tokenz"),
        (b'{"model": "m", "prompt": "hi", "presence_penalty": 0.5}', "presence_penalty"),
    ],
)
def test_bad_completion_bodies_name_the_field(body, param):
    with pytest.raises(OpenAIError) as err:
        parse_request(body, CompletionRequest)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_body_errors_and_neutral_fields():
    with pytest.raises(OpenAIError) as err:
        parse_request(b'{"model": "m", "messages": []}', ChatCompletionRequest)
    assert err.value.param == "messages"
    with pytest.raises(OpenAIError) as err:
        parse_request(b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', ChatCompletionRequest)
    assert err.value.param == "messages[0].role"
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "presence_penalty": 0, "logprobs": False, "user": "u1", "temperature": 1}
    req = parse_request(json.dumps(body).encode(), ChatCompletionRequest)
    assert req.messages[0].as_template_input() == {"role": "user", "content": "hi"}
    assert (req.temperature, req.top_p, req.n, req.stream, req.stops) == (1.0, 1.0, 1, False, ())


def test_engine_parse_limits(engine, gen):
    def parse(kind, **body):
        return engine.parse(kind, json.dumps({"model": "tiny-gpt2", **body}).encode())

    def fails(kind, **body) -> OpenAIError:
        with pytest.raises(OpenAIError) as err:
            parse(kind, **body)
        return err.value

    job = parse("completion", prompt=["a b", "c"], n=2)
    assert job.generation.rows == 4 and job.generation.params.max_tokens == 4  # default_max_tokens
    assert job.id.startswith("cmpl-") and not job.stream
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    chat = parse("chat", messages=messages, max_completion_tokens=9, stop="x")
    # ChatML from the tiny model's template, tokenised without extra special tokens
    expected = gen.tokenizer("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False).input_ids
    assert chat.generation.prompts == [expected] and chat.generation.params.max_tokens == 9
    assert chat.generation.params.stop == ("x",)

    e = fails("completion", prompt="hi", max_tokens=33)
    assert (e.status, e.param) == (400, "max_tokens")
    e = fails("chat", messages=messages, max_completion_tokens=100)
    assert (e.status, e.param) == (400, "max_completion_tokens")
    e = fails("completion", prompt="word " * 60)  # 60 words > max_prompt_tokens=40
    assert (e.status, e.param) == (400, "prompt") and "more than this server's limit of 40" in e.message
    e = fails("completion", prompt=["a", "b"], n=3)  # 2 prompts x 3 = 6 sequences > max_rows=4
    assert (e.status, e.param) == (400, "n")
    with pytest.raises(OpenAIError) as unknown_model:
        engine.parse("completion", b'{"model": "gpt-4", "prompt": "hi"}')
    assert (unknown_model.value.status, unknown_model.value.param) == (404, "model")


def test_engine_prompt_limit_defaults_to_the_rest_of_the_context(gen):
    assert OpenAIEngine(gen, "m", Limits(16, 200, None, 4, 30)).limits.max_prompt_tokens == 312  # 512 - 200
    with pytest.raises(ValueError, match="context length"):
        OpenAIEngine(gen, "m", Limits(16, 256, 300, 4, 30))  # 300 + 256 > 512 positions


def _job(kind: str, rows: int = 2, include_usage: bool = False) -> Job:
    generation = GenerationRequest([[1, 2, 3]], rows, params(4), time.monotonic() + 5)
    return Job(kind=kind, id="x-1", created=7, model="m", stream=True, include_usage=include_usage,
               timeout_s=5, generation=generation)


def _update(choices: list[ChoiceDelta], tokens: int, done: bool) -> Update:
    return Update(choices, prompt_tokens=3, completion_tokens=tokens, done=done, batch_requests=3, batch_rows=5)


def test_job_response_and_chunks():
    job = _job("completion")
    job.add(_update([ChoiceDelta(0, "Hel", None), ChoiceDelta(1, "A", "stop")], 2, False))
    job.add(_update([ChoiceDelta(0, "lo", "length")], 4, True))
    out = job.response()
    assert out["object"] == "text_completion" and job.batch == (3, 5)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [(0, "Hello", "length"), (1, "A", "stop")]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

    chat = _job("chat", rows=1, include_usage=True)
    first = chat.chunks(_update([ChoiceDelta(0, "Hi", None)], 1, False))
    last = chat.chunks(_update([ChoiceDelta(0, "!", "stop")], 2, True))
    assert first[0]["object"] == "chat.completion.chunk" and "usage" not in first[0]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert last[0]["choices"][0]["delta"] == {"content": "!"} and last[0]["choices"][0]["finish_reason"] == "stop"
    assert last[1]["choices"] == [] and last[1]["usage"]["total_tokens"] == 5
    assert chat.response()["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}


def test_timed_out_choice_fails_the_job_with_504():
    job = _job("completion", rows=1)
    with pytest.raises(OpenAIError) as err:
        job.add(_update([ChoiceDelta(0, "", "timeout")], 0, True))
    assert err.value.status == 504 and "request_timeout_s=5" in err.value.message


# --- config --------------------------------------------------------------------------------


def test_serve_yaml_is_a_serve_config_and_a_serve_config():
    path = CONFIG_DIR / "serve.yaml"
    raw = load_yaml(path)
    schema = ServeDeploySchema.model_validate(raw)  # what `serve run` / `serve deploy` accept
    assert schema.http_options.host == "127.0.0.1"
    assert schema.applications[0].import_path == IMPORT_PATH
    cfg = load_serve_config()
    assert cfg == ServeConfig(port=schema.http_options.port, app_name=schema.applications[0].name)
    assert cfg.host == "127.0.0.1" and cfg.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("override", "field"),
    [("max_batch_size=0", "max_batch_size"), ("max_tokenz=3", "max_tokenz"),
     ("max_ongoing_requests=2", "max_ongoing_requests"), ("autoscaling.min_replicas=5", "min_replicas"),
     ("port=70000", "port")],
)
def test_bad_serve_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_serve_config(None, [override])
    assert field in str(err.value)


def test_app_builder_options_and_errors():
    app = app_builder({"model": "tiny-gpt2", "num_replicas": 2, "max_ongoing_requests": 12, "num_cpus": 0.5})
    d = app._bound_deployment
    assert (d.num_replicas, d.max_ongoing_requests, d.ray_actor_options["num_cpus"]) == (2, 12, 0.5)
    scaled = app_builder({"autoscaling": {"min_replicas": 1, "max_replicas": 3}})._bound_deployment
    assert scaled._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ConfigError, match="max_batch_size"):
        app_builder({"max_batch_size": "many"})


def test_cli_rejects_bad_input_before_ray(tmp_path, capsys):
    assert cli_main(["serve", "--set", "max_batch_size=0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path / "nothing-here")]) == 2
    assert "model:" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "tiny-gpt2", "--set", "max_tokens=600"]) == 2
    assert "context length of tiny-gpt2 (512)" in capsys.readouterr().err
    assert not ray.is_initialized()
