"""The serving decode loop without a server: continuous batching, sampling, stops, expiry, scheduler."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from rayrlhf.actors.generation.decode_loop import PAD_SPLIT_TOKENS, DecodeLoop, prefill_groups
from rayrlhf.actors.generation.kv_batch import ROOM, KVBatch
from rayrlhf.actors.generation.model_runner import GenerationError
from rayrlhf.actors.generation.requests import ChoiceDelta, GenerationRequest, SamplingParams, Update
from rayrlhf.actors.generation.sampler import mix_seed, row_generator, sample_tokens, scaled_logprobs
from rayrlhf.actors.generation.text_stream import find_stop, held_back
from rayrlhf.actors.runtime.models import load_policy
from rayrlhf.actors.runtime.torch_thread import TorchThread
from rayrlhf.actors.serving.scheduler import ContinuousScheduler
from rayrlhf.actors.serving.text_generator import TextGenerator

PROMPTS = ["What is 2 plus 3?", "Hello there, how many items are in the big box today?"]
Texts = dict[GenerationRequest, dict[int, str]]


def params(max_tokens: int, temperature: float = 0.0, stop: tuple[str, ...] = (), seed: int | None = None,
           top_p: float = 1.0) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)


def request(ids: list[int], p: SamplingParams, n: int = 1, timeout: float = 60.0) -> GenerationRequest:
    return GenerationRequest([ids], n, p, time.monotonic() + timeout)


def run(gen: TextGenerator, schedule: dict[int, list[GenerationRequest]], max_rows: int = 8
        ) -> tuple[Texts, list[dict[GenerationRequest, Update]]]:
    """Admit schedule[k] before step k, step until all are done: texts per request and choice, and
    every step's updates."""
    loop = DecodeLoop(gen, max_rows)
    texts: Texts = {}
    steps: list[dict[GenerationRequest, Update]] = []
    while loop.requests or len(steps) <= max(schedule):
        for r in schedule.get(len(steps), []):
            loop.admit(r)
        updates = dict(loop.step())
        steps.append(updates)
        for r, u in updates.items():
            for c in u.choices:
                texts.setdefault(r, {})[c.index] = texts.get(r, {}).get(c.index, "") + c.text
    return texts, steps


def hf_greedy(tiny_dir, ids: list[int], n: int) -> str:
    model, tok = load_policy(tiny_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


# --- pure helpers ---------------------------------------------------------------------------


def test_consecutive_updates_merge_into_one():
    first = Update([ChoiceDelta(0, "Hel", None, [7], [-0.5]), ChoiceDelta(1, "A", None)], 5, 2, False, 3, 4)
    second = Update([ChoiceDelta(0, "lo", "stop", [8, 2], [-1.0, -2.0])], 5, 4, False, 2, 6)
    third = Update([ChoiceDelta(1, "B", "length")], 5, 5, True, 1, 1)
    merged = first.then(second).then(third)
    assert merged.choices == [ChoiceDelta(0, "Hello", "stop", [7, 8, 2], [-0.5, -1.0, -2.0]),
                              ChoiceDelta(1, "AB", "length")]
    assert (merged.prompt_tokens, merged.completion_tokens, merged.done) == (5, 5, True)
    assert (merged.batch_requests, merged.batch_rows) == (3, 4)  # the busiest step, as Job.add keeps it


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
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    scores = scaled_logprobs(logits, temperature)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    seen: set[int] = set()
    counts = [0, 0, 0]
    for _ in range(2000):
        out = sample_tokens(scores, temperature, torch.tensor([1.0, 0.6, 0.0, 1.0]), gens).tolist()
        assert out[0] == 0 and out[2] == 0  # greedy row; top_p=0 keeps only the top token
        seen.add(out[1])
        counts[out[3]] += 1
    assert seen == {0, 1}
    assert [round(c / 2000, 1) for c in counts] == [0.5, 0.3, 0.2]  # top_p=1: softmax(logits / T) itself


def test_a_rows_draws_depend_on_its_own_scores_and_generator_only():
    """The sampler's half of batch independence: a row draws the same tokens alone or beside rows that
    are greedy, cut by top_p (sorted) or not, at other temperatures."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    temperature, top_p = torch.tensor([0.7, 1.0, 0.0, 1.3]), torch.tensor([1.0, 0.8, 1.0, 0.5])

    def draws(rows: list[int]) -> list[list[int]]:
        gens = [row_generator(5, r) for r in rows]
        scores = scaled_logprobs(logits[rows], temperature[rows])
        return [sample_tokens(scores, temperature[rows], top_p[rows], gens).tolist() for _ in range(30)]

    together = draws([0, 1, 2, 3])
    for r in range(4):
        assert [d[r] for d in together] == [d[0] for d in draws([r])]
    assert len({d[0] for d in together}) > 3 and {d[2] for d in together} == {int(logits[2].argmax())}
    assert torch.allclose(scaled_logprobs(logits, temperature)[2], torch.log_softmax(logits[2], -1))  # greedy: T=1


def test_kv_batch_pads_joiners_and_trims_what_no_row_needs():
    def prefill(lengths: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        keys = torch.arange(len(lengths) * width, dtype=torch.float).reshape(len(lengths), 1, width, 1)
        return DynamicCache([(keys, -keys)]), mask

    batch = KVBatch()
    batch.join(*prefill([5]), torch.tensor([5]), torch.tensor([7]))
    batch.join(*prefill([2, 3]), torch.tensor([2, 3]), torch.tensor([8, 9]))
    assert batch.mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    keys = batch.cache.layers[0].keys[:, 0, :, 0]
    assert keys.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 3, 4, 5]]  # joiners padded on the left
    assert batch.next_ids.tolist() == [7, 8, 9] and batch.positions.tolist() == [5, 2, 3]
    buffer = batch.cache.layers[0]._keys
    batch.keep([2, 1])  # the long row leaves: two padding columns are no longer needed
    assert batch.cache.layers[0]._keys is buffer  # rows compacted in place: nothing allocated
    assert batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.cache.layers[0].keys[:, 0, :, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert batch.cache.layers[0].values[:, 0, :, 0].tolist() == [[-3, -4, -5], [-0, -1, -2]]
    assert batch.next_ids.tolist() == [9, 8]
    layer = batch.cache.layers[0]
    buffer, step = layer._keys, torch.tensor([[[[10.0]]], [[[11.0]]]])
    for _ in range(ROOM):  # decode steps write into the spare columns: no copy of the cache
        keys, _ = layer.update(step, -step)
    assert layer._keys is buffer and keys.shape[2] == 3 + ROOM and keys[:, 0, 2:4, 0].tolist() == [[5, 10], [2, 11]]
    keys, values = layer.update(step + 1, -step - 1)  # out of room: copied once into a larger buffer
    assert layer._keys is not buffer and keys[:, 0, -3:, 0].tolist() == [[10, 10, 11], [11, 11, 12]]
    assert values[:, 0, :2, 0].tolist() == [[-3, -4], [-0, -1]] and keys.data_ptr() == layer._keys.data_ptr()
    batch.keep([])
    assert len(batch) == 0 and batch.cache is None


# --- the decode loop --------------------------------------------------------------------------


def test_batched_greedy_matches_hf_generate_and_rows_leave_at_once(gen, tiny_dir):
    ids = [gen.encode_text(p) for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])  # different lengths: left padding is exercised
    short, long = request(ids[0], params(3)), request(ids[1], params(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from the cache API (past_key_values)
        texts, steps = run(gen, {0: [short, long]})
    assert texts[short][0] == hf_greedy(tiny_dir, ids[0], 3)
    assert texts[long][0] == hf_greedy(tiny_dir, ids[1], 7)
    assert len(steps) == 7  # the prefill gives the first token, each later step one more
    assert steps[2][short].done and steps[2][short].completion_tokens == 3
    assert steps[2][short].choices[-1].finish_reason == "length"
    assert all(short not in s for s in steps[3:])  # the short request left the batch
    assert (steps[3][long].batch_requests, steps[3][long].batch_rows) == (1, 1)
    final = steps[-1][long]
    assert final.done and final.completion_tokens == 7 and final.prompt_tokens == len(ids[1])
    assert (steps[0][long].batch_requests, steps[0][long].batch_rows) == (2, 2)


def test_a_request_joins_the_running_batch_and_its_text_does_not_depend_on_it(gen, tiny_dir):
    ids = [gen.encode_text(p) for p in PROMPTS]
    greedy, seeded = params(12), params(12, temperature=1.0, top_p=0.9, seed=5)
    alone_g, alone_s = request(ids[0], greedy), request(ids[0], seeded, n=2)
    texts_alone = {**run(gen, {0: [alone_g]})[0], **run(gen, {0: [alone_s]})[0]}
    # busy[1] is seeded: unseeded, it once sampled an EOS before step 3 and left the batch early
    busy = [request(ids[1] * 3, params(30)), request(ids[1], params(25, temperature=0.8, seed=3)),
            request(gen.encode_text("x"), params(4))]
    late_g, late_s = request(ids[0], greedy), request(ids[0], seeded, n=2)
    texts, steps = run(gen, {0: busy[:2], 3: [late_g, busy[2]], 6: [late_s]})
    assert texts[late_g] == texts_alone[alone_g] == {0: hf_greedy(tiny_dir, ids[0], 12)}
    assert texts[late_s] == texts_alone[alone_s] and texts[late_s][0] != texts[late_s][1]
    # the late greedy request got its first token in the step it was admitted, beside 2 running requests
    assert steps[3][late_g].completion_tokens == 1 and steps[3][late_g].batch_requests == 4
    assert steps[6][late_s].batch_rows == 2 + 1 + 2 + 1  # busy[0], busy[1] (1 row each) and late_g running
    other_seed = run(gen, {0: [request(ids[0], params(12, temperature=1.0, top_p=0.9, seed=6))]})[0]
    assert list(other_seed.values())[0][0] != texts[late_s][0]


def test_token_ids_and_logprobs_on_request_and_the_rollouts_batch_runs_the_same_loop(gen):
    ids = [gen.encode_text(p) for p in PROMPTS]
    seeded = params(10, temperature=0.8, top_p=0.9, seed=7)
    asked = GenerationRequest([ids[0]], 2, seeded, time.monotonic() + 60, logprobs=True)
    plain = request(ids[0], seeded, n=2)
    texts, steps = run(gen, {0: [request(ids[1], params(20)), asked], 2: [plain]})
    tokens: dict[int, list[int]] = {0: [], 1: []}
    logprobs: dict[int, list[float]] = {0: [], 1: []}
    for c in (c for step in steps if asked in step for c in step[asked].choices):
        tokens[c.index] += c.token_ids
        logprobs[c.index] += c.logprobs
    assert texts[asked] == texts[plain]  # asking for log-probs changes nothing else
    assert not any(c.token_ids or c.logprobs for step in steps if plain in step for c in step[plain].choices)
    for choice in (0, 1):
        assert gen.decode([t for t in tokens[choice] if t not in gen.eos_ids]) == texts[asked][choice]
        with torch.no_grad():  # log softmax(logits / T) of a full forward pass, by hand
            logits = gen.model(torch.tensor([ids[0] + tokens[choice]])).logits[0, len(ids[0]) - 1:-1] / 0.8
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[choice])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs[choice]), expected, atol=1e-5)
    # the rollout's call: one request stepped to its end in the same loop, so the same tokens and log-probs
    batch = gen.generate([ids[0]], 2, seeded)
    for choice in (0, 1):
        n = len(tokens[choice])
        assert batch.tokens[choice, :n].tolist() == tokens[choice] and (batch.tokens[choice, n:] == gen.pad_id).all()
        assert torch.allclose(batch.logprobs[choice, :n], torch.tensor(logprobs[choice]), atol=1e-6)
        assert (batch.logprobs[choice, n:] == 0).all()
    with pytest.raises(ValueError, match="stop strings"):
        gen.generate([ids[0]], 1, params(4, stop=("x",)))


def count_forwards(gen, monkeypatch, dim: int) -> list[int]:
    """The generator's forward calls from now on, each recorded by its input's size along `dim`."""
    sizes: list[int] = []
    real = gen.forward

    def counted(input_ids, attention_mask, position_ids, cache):
        sizes.append(input_ids.shape[dim])
        return real(input_ids, attention_mask, position_ids, cache)

    monkeypatch.setattr(gen, "forward", counted)
    return sizes


def test_requests_joining_at_one_step_share_one_prefill_forward(gen, tiny_dir, monkeypatch):
    ids = [gen.encode_text(p) for p in PROMPTS]
    seeded = params(6, temperature=1.0, seed=3)
    joiners = [request(ids[1], params(6)), request(ids[0], seeded, n=3), request(ids[0], params(1))]
    alone = {i: run(gen, {0: [request(r.prompts[0], r.params, r.n)]})[0] for i, r in enumerate(joiners)}
    forwards = count_forwards(gen, monkeypatch, dim=0)  # rows per forward
    running = request(ids[1], params(8))
    texts, steps = run(gen, {0: [running], 2: joiners})
    assert forwards[:4] == [1, 1, 1, 3]  # step 2: the running row's decode, then one prefill of 3 prompts
    assert forwards[4] == 1 + 1 + 3  # the 1-token request left after its prefill; 3 samples share a prompt
    assert steps[2][joiners[1]].batch_rows == 1 + 1 + 3 + 1
    for i, r in enumerate(joiners):  # the same text as alone, whatever the padding and neighbours
        assert texts[r] == list(alone[i].values())[0]
    assert len(set(texts[joiners[1]].values())) == 3


def test_a_long_prompt_is_prefilled_apart_from_short_ones(gen, monkeypatch):
    short, long = gen.encode_text(PROMPTS[0]), gen.encode_text(PROMPTS[1] * 8)
    assert len(long) - len(short) > PAD_SPLIT_TOKENS // 2  # padding two short rows to it would cost more
    both = GenerationRequest([long, short], 2, params(5), time.monotonic() + 60)  # choices 0-1 long, 2-3 short
    joiners = [request(short, params(5)), both, request(long[:-1], params(5))]
    groups = prefill_groups([(r, p) for r in joiners for p in range(len(r.prompts))])
    assert groups == [[(joiners[0], 0), (both, 1)], [(joiners[2], 0), (both, 0)]]  # by length; 1 token apart
    forwards = count_forwards(gen, monkeypatch, dim=1)  # columns per forward
    texts, _ = run(gen, {0: joiners})
    # two prefills, neither padded to the other's length; the long pair's common start goes first, once
    assert forwards[:3] == [len(short), len(long) - 2, 2]
    monkeypatch.undo()
    alone = {name: list(run(gen, {0: [request(ids, params(5))]})[0].values())[0][0]
             for name, ids in (("s", short), ("l", long))}
    assert texts[both] == {0: alone["l"], 1: alone["l"], 2: alone["s"], 3: alone["s"]}
    assert texts[joiners[0]] == {0: alone["s"]}


def test_the_tokens_every_prompt_starts_with_are_prefilled_once(gen, tiny_dir, monkeypatch):
    system = gen.encode_text(PROMPTS[1] * 5)  # a system prompt or worked example the prompts share
    qa, qb = gen.encode_text(" What is 2 plus 3?"), gen.encode_text(" Name a big box, then count the items in it.")
    assert len(system) >= PAD_SPLIT_TOKENS and qa[0] != qb[0] and len(qa) < len(qb)
    shapes: list[tuple[int, int, int]] = []  # (rows, new columns, mask columns) of each forward
    real = gen.forward

    def recorded(input_ids, attention_mask, position_ids, cache):
        shapes.append((*input_ids.shape, attention_mask.shape[1]))
        return real(input_ids, attention_mask, position_ids, cache)

    monkeypatch.setattr(gen, "forward", recorded)
    out = gen.generate([system + qa, system + qb], 1, params(5))
    n = len(system)
    assert shapes[:2] == [(1, n, n), (2, len(qb), n + len(qb))]  # the shared start once, then each prompt's own
    monkeypatch.undo()
    for row, q in enumerate((qa, qb)):  # what each prompt decodes alone, with the same log-probs
        ids, tokens = system + q, out.tokens[row].tolist()
        assert gen.decode(tokens) == hf_greedy(tiny_dir, ids, 5)
        with torch.no_grad():
            logits = gen.model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.allclose(out.logprobs[row], expected, atol=1e-5)


def test_finished_rows_free_their_slots_for_waiting_requests(gen):
    loop = DecodeLoop(gen, max_rows=3)
    ids = gen.encode_text(PROMPTS[0])
    first, second = request(ids, params(2), n=2), request(ids, params(10))
    loop.admit(first)
    loop.admit(second)
    assert loop.free_rows == 0
    with pytest.raises(ValueError, match="do not fit"):
        loop.admit(request(ids, params(2)))
    loop.step()
    assert loop.free_rows == 0
    updates = dict(loop.step())
    assert updates[first].done and loop.free_rows == 2 and len(loop.batch) == 1  # gone at once
    loop.admit(request(ids, params(2), n=2))
    assert len(dict(loop.step())) == 2 and len(loop.batch) == 3


def test_stop_string_truncates_and_never_streams_the_stop(gen):
    ids = gen.encode_text(PROMPTS[1])
    plain = request(ids, params(12))
    full = run(gen, {0: [plain]})[0][plain][0]
    stop = full[5:8]
    cut = full.find(stop)
    stopped = request(ids, params(12, stop=(stop,)))
    texts, steps = run(gen, {0: [stopped]})
    assert texts[stopped][0] == full[:cut]
    deltas = [c for s in steps for c in s[stopped].choices]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in deltas)
    assert steps[-1][stopped].completion_tokens < 12


def test_eos_ends_with_stop_and_is_counted(gen):
    ids = gen.encode_text(PROMPTS[0])
    probe = request(ids, params(1))
    first_token = gen.tokenizer(run(gen, {0: [probe]})[0][probe][0]).input_ids[0]
    saved = gen.eos_ids
    gen.eos_ids = [first_token]  # the greedy first token now ends the answer
    try:
        r = request(ids, params(5))
        texts, steps = run(gen, {0: [r]})
    finally:
        gen.eos_ids = saved
    assert texts[r][0] == "" and len(steps) == 1
    assert steps[0][r].choices[0].finish_reason == "stop" and steps[0][r].completion_tokens == 1


def test_deadline_and_cancel_end_rows_without_a_step(gen):
    ids = gen.encode_text(PROMPTS[0])
    late = request(ids, params(5), timeout=-1.0)
    gone = request(ids, params(5))
    gone.cancelled = True
    ok = request(ids, params(2))
    texts, steps = run(gen, {0: [late, gone, ok]})
    first = steps[0]
    assert [c.finish_reason for c in first[late].choices] == ["timeout"] and first[late].completion_tokens == 0
    assert [c.finish_reason for c in first[gone].choices] == ["cancelled"]
    assert first[ok].batch_requests == 1  # the expired ones were never prefilled
    assert len(steps) == 2 and steps[-1][ok].done and texts[ok][0]
    running = request(ids, params(20))
    loop = DecodeLoop(gen, 4)
    loop.admit(running)
    loop.step()
    running.cancelled = True
    assert dict(loop.step())[running].choices[0].finish_reason == "cancelled"
    assert len(loop.batch) == 0 and not loop.requests


def test_non_finite_weights_raise_generation_error(tiny_dir):
    broken = TextGenerator(tiny_dir, "float32", torch_threads=1)
    with torch.no_grad():
        broken.model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(GenerationError, match="non-finite"):
        run(broken, {0: [request(broken.encode_text("hi"), params(3, temperature=1.0))]})


# --- the scheduler ------------------------------------------------------------------------------


def test_scheduler_admits_waiting_requests_as_rows_free_up(gen):
    ids = gen.encode_text(PROMPTS[0])
    scheduler = ContinuousScheduler(DecodeLoop(gen, max_rows=2), join_wait_steps=0)

    async def consume(r: GenerationRequest) -> list[Update]:
        return [u async for u in scheduler.run(r)]

    async def main():
        long = asyncio.create_task(consume(request(ids, params(30))))
        while scheduler.stats.steps == 0:  # the long one is decoding
            await asyncio.sleep(0.001)
        short = [asyncio.create_task(consume(request(ids, params(3)))) for _ in range(3)]
        return await long, await asyncio.gather(*short)

    long, short = asyncio.run(main())
    assert long[-1].done and long[-1].completion_tokens == 30
    # one slot beside the long request: the three short ones took it in turn, each beside it
    assert all(u[-1].done and u[-1].completion_tokens == 3 for u in short)
    assert all(u[0].batch_rows == 2 for u in short)
    stats = scheduler.stats.as_dict()
    assert stats["requests"] == 4 and stats["max_rows_in_step"] == 2 and stats["running_rows"] == 0
    assert stats["steps"] == 30  # the short ones ran inside the long one's steps


def test_torch_thread_runs_every_call_on_one_thread_with_its_torch_threads():
    thread = TorchThread(torch_threads=3)
    here = threading.get_ident()

    async def main():
        return [await thread.run(lambda: (threading.get_ident(), torch.get_num_threads())) for _ in range(3)]

    seen = [thread.call(lambda: (threading.get_ident(), torch.get_num_threads()))] + asyncio.run(main())
    assert len({ident for ident, _ in seen}) == 1 and seen[0][0] != here
    assert {n for _, n in seen} == {3}


def test_a_long_call_on_the_torch_thread_lets_the_calls_queued_behind_it_run_between_its_steps():
    thread = TorchThread(torch_threads=1)
    order, started, go = [], threading.Event(), threading.Event()

    def long() -> int:
        started.set()
        go.wait()
        for i in range(3):
            order.append(f"long {i}")
            thread.yield_turn()  # a beam search does this after each token
        return threading.get_ident()

    first = thread.submit(long)
    started.wait()
    short = thread.submit(lambda: order.append("short") or threading.get_ident())
    go.set()
    assert first.result(timeout=30) == short.result(timeout=30)  # one thread for both
    assert order == ["long 0", "short", "long 1", "long 2"]
    with pytest.raises(AssertionError, match="for calls running on the torch thread"):
        thread.yield_turn()


def test_scheduler_runs_every_step_on_the_torch_thread(tiny_dir):
    """The generator is built and every decode step runs on one thread (actors/runtime/torch_thread.py)."""
    thread = TorchThread(torch_threads=1)
    gen = thread.call(TextGenerator, tiny_dir, "float32", 1)
    forward_threads = set()
    forward = gen.forward

    def recording(*args, **kwargs):
        forward_threads.add(threading.get_ident())
        return forward(*args, **kwargs)

    gen.forward = recording
    scheduler = ContinuousScheduler(DecodeLoop(gen, max_rows=2), join_wait_steps=0, thread=thread)

    async def main():
        return [u async for u in scheduler.run(request(gen.encode_text(PROMPTS[0]), params(5)))]

    updates = asyncio.run(main())
    assert updates[-1].done and updates[-1].completion_tokens == 5
    assert forward_threads == {thread.call(threading.get_ident)}


def test_a_reader_that_falls_behind_gets_the_missed_steps_as_one_update(gen):
    ids = gen.encode_text(PROMPTS[0])
    scheduler = ContinuousScheduler(DecodeLoop(gen, max_rows=2), join_wait_steps=0)

    async def read(slow: bool) -> list[Update]:
        out = []
        async for update in scheduler.run(request(ids, params(12))):
            out.append(update)
            if slow:  # e.g. a client that reads slowly: the steps go on meanwhile
                await asyncio.sleep(0.05)
        return out

    prompt = asyncio.run(read(slow=False))
    late = asyncio.run(read(slow=True))
    assert len(prompt) == 12 and len(late) < len(prompt)
    assert "".join(c.text for u in late for c in u.choices) == "".join(c.text for u in prompt for c in u.choices)
    assert late[-1].done and late[-1].completion_tokens == 12


@pytest.mark.parametrize("wait", [0, 3])
def test_arrivals_beside_running_rows_gather_for_one_prefill(gen, wait):
    ids = gen.encode_text(PROMPTS[0])
    scheduler = ContinuousScheduler(DecodeLoop(gen, max_rows=4), join_wait_steps=wait)

    async def consume(r: GenerationRequest) -> tuple[int, list[Update]]:
        """Steps from the request's arrival to its first update, and its updates."""
        arrived, updates = scheduler.stats.steps, []
        async for u in scheduler.run(r):
            if not updates:
                waited = scheduler.stats.steps - arrived
            updates.append(u)
        return waited, updates

    async def main():
        long = asyncio.create_task(consume(request(ids, params(30))))
        while scheduler.stats.steps < 2:  # the long one is decoding
            await asyncio.sleep(0.001)
        short = [asyncio.create_task(consume(request(ids, params(3)))) for _ in range(2)]  # 2 of 3 free rows
        return await long, await asyncio.gather(*short)

    (_, long), short = asyncio.run(main())
    assert long[-1].completion_tokens == 30 and all(u[-1].done for _, u in short)
    assert all(u[0].batch_requests == 3 for _, u in short)  # prefilled together, beside the long one
    # they arrive during a step; admitted before the step `wait` steps after it (the next one at least),
    # and their first update comes from that step
    assert [waited for waited, _ in short] == [max(wait, 1) + 1] * 2


def test_scheduler_fails_the_requests_in_flight_not_itself(tiny_dir, gen):
    broken = TextGenerator(tiny_dir, "float32", torch_threads=1)
    with torch.no_grad():
        broken.model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    scheduler = ContinuousScheduler(DecodeLoop(broken, max_rows=2), join_wait_steps=0)

    async def main() -> int:
        failures = 0
        for _ in range(2):  # the scheduler's loop survives a failed step
            with pytest.raises(GenerationError):
                async for _ in scheduler.run(request(broken.encode_text("hi"), params(2))):
                    pass
            failures += 1
        return failures

    assert asyncio.run(main()) == 2 and not scheduler.loop.requests and scheduler.stats.cancelled == 0


def test_a_caller_that_stops_listening_frees_its_rows(gen):
    scheduler = ContinuousScheduler(DecodeLoop(gen, max_rows=1), join_wait_steps=4)
    ids = gen.encode_text(PROMPTS[0])

    async def main() -> list[Update]:
        stream = scheduler.run(request(ids, params(200)))
        await anext(stream)
        await stream.aclose()  # e.g. the HTTP client went away mid-stream
        return [u async for u in scheduler.run(request(ids, params(2)))]  # needs the only slot

    after = asyncio.run(main())
    assert after[-1].done and scheduler.stats.cancelled == 1 and scheduler.stats.running_rows == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a Serve replica's generator on its GPU")
def test_generator_on_the_gpu_decodes_what_the_cpu_decodes(tiny_dir, gen):
    on_gpu = TextGenerator(tiny_dir, "float32", torch_threads=1, device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    ids = gen.encode_text("The capital of France is")
    p = params(12)
    cpu_req, gpu_req = request(ids, p), request(ids, p)
    cpu_texts, _ = run(gen, {0: [cpu_req]})
    gpu_texts, _ = run(on_gpu, {0: [gpu_req]})
    assert gpu_texts[gpu_req] == cpu_texts[cpu_req]


def test_a_large_call_decodes_at_most_max_rows_at_once_with_seeds_by_part(gen, monkeypatch):
    ids = [gen.encode_text(p) for p in PROMPTS * 3]  # 6 prompts x 2 samples = 12 rows
    seeded = params(6, temperature=1.0, seed=11)
    whole = gen.generate(ids, 2, seeded)  # no cap: one request, the call's own seed
    assert gen.generate(ids, 2, seeded, max_rows=12).tokens.tolist() == whole.tokens.tolist()  # fits: the same

    in_flight: list[int] = []
    step = DecodeLoop.step

    def counted(loop):
        out = step(loop)
        in_flight.append(loop.step_rows)
        return out

    monkeypatch.setattr(DecodeLoop, "step", counted)
    capped = gen.generate(ids, 2, seeded, max_rows=5)  # parts of 2 prompts (4 rows): at most 5 rows at once
    monkeypatch.undo()
    assert max(in_flight) <= 5 and len(capped.tokens) == 12
    # part i draws from mix_seed(seed, i): the same tokens as that part asked for alone with that seed
    for i in range(3):
        alone = gen.generate(ids[2 * i:2 * i + 2], 2, replace(seeded, seed=mix_seed(11, i)))
        width = alone.tokens.shape[1]
        assert capped.tokens[4 * i:4 * i + 4, :width].tolist() == alone.tokens.tolist()
        assert (capped.tokens[4 * i:4 * i + 4, width:] == gen.pad_id).all()
