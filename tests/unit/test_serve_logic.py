"""The serving logic without a server: request parsing, responses, config (the decode loop: test_serve_decode.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from ray.serve.schema import ServeDeploySchema

from rayrlhf.actors.generation.requests import ChoiceDelta, GenerationRequest, SamplingParams, Update
from rayrlhf.actors.serving.openai_requests import Job, Limits, OpenAIEngine
from rayrlhf.actors.serving.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    parse_request,
)
from rayrlhf.jobs.cli import main as cli_main
from rayrlhf.jobs.config.base import CONFIG_DIR, ConfigError, load_yaml
from rayrlhf.jobs.config.serve import IMPORT_PATH, ServeConfig, load_serve_config
from rayrlhf.jobs.serve import app_builder, build_app, prepare, with_replica_cpus


@pytest.fixture(scope="module")
def engine(gen) -> OpenAIEngine:
    limits = Limits(default_max_tokens=4, max_tokens=32, max_prompt_tokens=40, max_rows=4, request_timeout_s=30)
    return OpenAIEngine(gen, "tiny-gpt2", limits)


def params(max_tokens: int, temperature: float = 0.0, stop: tuple[str, ...] = (), seed: int | None = None):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, stop=stop, seed=seed)


# --- OpenAI requests and responses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"prompt": "hi"}', "model"),
        (b'{"model": "m", "prompt": ""}', "prompt"),
        (b'{"model": "m", "prompt": ["a", ""]}', "prompt"),
        (b'{"model": "m", "prompt": [1, "a"]}', "prompt"),  # token ids or texts, not both
        (b'{"model": "m", "prompt": [[1], []]}', "prompt"),
        (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', "temperature"),
        (b'{"model": "m", "prompt": "hi", "temperature": 2.5}', "temperature"),
        (b'{"model": "m", "prompt": "hi", "n": 1.5}', "n"),
        (b'{"model": "m", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "prompt": "hi", "stream": "yes"}', "stream"),
        (b'{"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"model": "m", "prompt": "hi", "max_tokenz": 3}', "max_tokenz"),
        (b'{"model": "m", "prompt": "hi", "presence_penalty": 0.5}', "presence_penalty"),
        (b'{"model": "m", "prompt": "hi", "seed": -5}', "seed"),
        (b'{"model": "m", "prompt": "hi", "seed": 1.5}', "seed"),
        (b'{"model": "m", "prompt": "hi", "seed": 18446744073709551616}', "seed"),  # 2**64
        (b'{"model": "m", "prompt": "hi", "top_p": -0.1}', "top_p"),
        (b'{"model": "m", "prompt": "hi", "top_p": NaN}', None),  # not JSON
        (b'{"model": "m", "prompt": "hi", "temperature": Infinity}', None),
        (b'{"model": "m", "prompt": "hi", "n": 0}', "n"),
        (b'{"model": "m", "prompt": "hi", "stop": [1]}', "stop"),
        (b'{"model": "m", "prompt": "hi", "stop": ""}', "stop"),
        (b'{"model": "m", "prompt": "hi", "max_tokens": "8"}', "max_tokens"),
        (b'{"model": "m", "prompt": {"a": 1}}', "prompt"),
        (b'{"model": "m", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b"\xff\xfe", None),
        (b'{"model": "m", "prompt": "hi", "num_beams": 0}', "num_beams"),
        (b'{"model": "m", "prompt": "hi", "num_beams": "2"}', "num_beams"),
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
    e = fails("completion", prompt="a \ud800 b")  # an unpaired surrogate: valid JSON, not tokenisable
    assert (e.status, e.param) == (400, "prompt")
    e = fails("chat", messages=[{"role": "user", "content": "\ud800"}])
    assert (e.status, e.param) == (400, "messages")
    assert parse("completion", prompt="hi", top_p=0, seed=0).generation.params.top_p == 0  # top token only
    beams = parse("completion", prompt="hi", num_beams=3, n=2).generation
    assert (beams.num_beams, beams.rows) == (3, 2)
    e = fails("completion", prompt="hi", num_beams=2, n=3)
    assert (e.status, e.param) == (400, "n") and "n <= num_beams" in e.message
    e = fails("completion", prompt=["a", "b"], num_beams=3)  # 2 prompts x 3 beams > max_rows=4
    assert (e.status, e.param) == (400, "num_beams")
    e = fails("completion", prompt=["a", "b"], n=3)  # 2 prompts x 3 = 6 sequences > max_rows=4
    assert (e.status, e.param) == (400, "n")
    with pytest.raises(OpenAIError) as unknown_model:
        engine.parse("completion", b'{"model": "gpt-4", "prompt": "hi"}')
    assert (unknown_model.value.status, unknown_model.value.param) == (404, "model")


def test_engine_prompt_limit_defaults_to_the_rest_of_the_context(gen):
    assert OpenAIEngine(gen, "m", Limits(16, 200, None, 4, 30)).limits.max_prompt_tokens == 312  # 512 - 200
    with pytest.raises(ValueError, match="context length"):
        OpenAIEngine(gen, "m", Limits(16, 256, 300, 4, 30))  # 300 + 256 > 512 positions


def test_engine_tokenises_without_the_decode_threads_tokenizer_lock(engine, gen):
    """A long prompt being encoded must not keep the decode thread from turning tokens into text."""
    jobs = []
    with gen._tokenizer_lock:  # held by the decode thread, as in a step
        parser = threading.Thread(target=lambda: jobs.append(engine.parse("completion", b'{"model": "tiny-gpt2", '
                                                                                   b'"prompt": "What is 2 plus 3?"}')))
        parser.start()
        parser.join(timeout=10)
    assert jobs and jobs[0].generation.prompts == [gen.tokenizer("What is 2 plus 3?").input_ids]


def test_an_answer_is_kept_for_feedback_with_its_prompts_as_train_rm_reads_them(engine, gen):
    def parse(kind, **body):
        return engine.parse(kind, json.dumps({"model": "tiny-gpt2", **body}).encode())

    job = parse("completion", prompt=["a b", "c"], n=2)
    job.texts = {0: "x", 3: "y"}
    served = job.served()
    assert (served.id, served.version) == (job.id, "tiny-gpt2")
    assert served.prompts == ["a b", "a b", "c", "c"] and served.texts == ["x", "", "", "y"]
    ids = gen.tokenizer("What is 2 plus 3?").input_ids
    assert parse("completion", prompt=ids).served().prompts == ["What is 2 plus 3?"]  # token ids decoded
    chat = parse("chat", messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                   {"role": "user", "content": "Hi"}], n=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.served().prompts == [messages, messages]


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


def test_replica_torch_threads_follow_its_cpu_reservation_unless_set():
    assert ServeConfig().threads == 1
    assert ServeConfig(num_cpus=2).threads == 2 and ServeConfig(num_cpus=0.5).threads == 1
    assert ServeConfig(num_cpus=2, torch_threads=1).threads == 1


def test_replicas_share_a_local_machines_cores_by_default(monkeypatch):
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    one = with_replica_cpus(ServeConfig())
    assert (one.num_cpus, one.threads) == (2.0, 2)  # one replica on a 2-core machine: both cores
    assert with_replica_cpus(ServeConfig(num_replicas=4)).num_cpus == 0.5
    assert with_replica_cpus(ServeConfig(autoscaling={"max_replicas": 2}, num_replicas=1)).num_cpus == 1.0
    versions = [{"name": "A", "model": "tiny-gpt2"}, {"name": "B", "model": "tiny-gpt2"}]
    assert with_replica_cpus(ServeConfig(versions=versions)).num_cpus == 1.0  # two versions, a replica each
    assert with_replica_cpus(ServeConfig(num_cpus=0.5)).num_cpus == 0.5  # given: kept
    d = app_builder({"model": "tiny-gpt2"})._bound_deployment
    assert d.ray_actor_options["num_cpus"] == 2.0
    nodes[1]["Alive"] = True  # a cluster of several nodes: 1 each
    assert with_replica_cpus(ServeConfig()).num_cpus == 1.0
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # before Ray is up (serve run of an import path)
    assert with_replica_cpus(ServeConfig()).num_cpus == 1.0


@pytest.mark.parametrize(
    ("override", "field"),
    [("max_batch_size=0", "max_batch_size"), ("max_tokenz=3", "max_tokenz"),
     ("max_ongoing_requests=2", "max_ongoing_requests"), ("autoscaling.min_replicas=5", "min_replicas"),
     ("port=70000", "port"), ("max_body_bytes=10", "max_body_bytes"),
     ("max_queued_requests=0", "max_queued_requests"), ("retry_after_s=-1", "retry_after_s")],
)
def test_bad_serve_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_serve_config(None, [override])
    assert field in str(err.value)


def test_app_builder_options_and_errors():
    app = app_builder({"model": "tiny-gpt2", "num_replicas": 2, "max_ongoing_requests": 12, "num_cpus": 0.5})
    d = app._bound_deployment
    assert (d.num_replicas, d.max_ongoing_requests, d.ray_actor_options["num_cpus"]) == (2, 12, 0.5)
    assert d._deployment_config.health_check_period_s == 10.0  # Serve's own default
    assert app_builder({"health_check_period_s": 1})._bound_deployment._deployment_config.health_check_period_s == 1
    scaled = app_builder({"autoscaling": {"min_replicas": 1, "max_replicas": 3}})._bound_deployment
    assert scaled._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ConfigError, match="max_batch_size"):
        app_builder({"max_batch_size": "many"})
    queued = app_builder({"max_queued_requests": 5, "retry_after_s": 2.5})._bound_deployment
    assert (queued.max_queued_requests, queued.backpressure_config.status_code) == (5, 503)
    assert queued.backpressure_config.retry_after_s == 2.5
    assert app_builder({"max_queued_requests": None})._bound_deployment.max_queued_requests == -1


def test_the_api_key_is_read_where_the_app_is_built_and_never_shown(monkeypatch):
    monkeypatch.setenv("RAYRLHF_TEST_KEY", "sk-secret-42")
    app = build_app(ServeConfig(auth_env="RAYRLHF_TEST_KEY"))
    config, key = app._bound_deployment.init_args
    assert key.get_secret_value() == "sk-secret-42" and "sk-secret-42" not in repr(key) + json.dumps(config)
    monkeypatch.delenv("RAYRLHF_TEST_KEY")
    assert build_app(ServeConfig(auth_env="RAYRLHF_TEST_KEY"))._bound_deployment.init_args[1] is None


def test_an_open_host_without_a_key_is_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv("RAYRLHF_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ConfigError, match="allow_open_host") as err:
            prepare(ServeConfig(host=host), local=False)
        assert f"host={host}" in str(err.value) and "$RAYRLHF_API_KEY" in str(err.value)
    with pytest.raises(ConfigError, match="auth_env is null"):
        prepare(ServeConfig(host="0.0.0.0", auth_env=None), local=False)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):  # loopback needs no key
        assert prepare(ServeConfig(host=host), local=False).host == host
    assert prepare(ServeConfig(host="0.0.0.0", allow_open_host=True), local=False).allow_open_host
    monkeypatch.setenv("RAYRLHF_API_KEY", "sk-x")
    assert prepare(ServeConfig(host="0.0.0.0"), local=False).host == "0.0.0.0"


def test_cli_rejects_bad_input_before_ray(tmp_path, capsys, monkeypatch):
    assert cli_main(["serve", "--set", "max_batch_size=0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path / "nothing-here")]) == 2
    assert "model:" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "tiny-gpt2", "--set", "max_tokens=600"]) == 2
    assert "context length of tiny-gpt2 (512)" in capsys.readouterr().err
    monkeypatch.delenv("RAYRLHF_API_KEY", raising=False)

    def must_not_start(*args, **kwargs):
        raise AssertionError("an open host without a key must be refused before Ray starts")

    monkeypatch.setattr("rayrlhf.jobs.serve.init_ray", must_not_start)  # never listen on 0.0.0.0, even if broken
    assert cli_main(["serve", "--model", "tiny-gpt2", "--set", "host=0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "host=0.0.0.0" in err and "allow_open_host" in err
    assert not ray.is_initialized()
