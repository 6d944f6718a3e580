"""The model-side roles without Ray: log-probs, rollout worker, reference policy, learner.

All on the random tiny GPT-2 (64-dim, 2 layers, 1.5k vocab). Its responses are gibberish and
rarely hit EOS, so EOS handling is tested with a scripted `generate`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.rl.logprobs import position_ids, token_logprobs
from rayrlhf.actors.runtime.models import load_policy, resolve_policy
from rayrlhf.actors.reference_policy import ReferencePolicy
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.rl.trajectory import LearnerBatch, Prompt, Rewards
from rayrlhf.actors.runtime.weight_sync import Weights
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.run import AlgorithmConfig, KLConfig, LearnerConfig, LoraConfig, PipelineConfig

K = 4  # samples per prompt
PROMPTS = [Prompt(id=5, text="What is 2 plus 3?", reference="5"), Prompt(id=7, text="Hello! How are you?")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(resolve_policy("tiny-gpt2", cache_dir=str(tmp_path_factory.mktemp("cache"))))


def make_worker(model_dir: str, **overrides) -> RolloutWorker:
    kwargs = dict(
        model=model_dir, max_prompt_tokens=64, use_chat_template=True, system_prompt=None,
        samples_per_prompt=K, max_new_tokens=6, temperature=1.0, top_p=1.0, torch_threads=1, seed=0,
    )  # fmt: skip
    return RolloutWorker(**(kwargs | overrides))


def unpadded_logprobs(model, ids: list[int], temperature: float) -> list[float]:
    """The hand loop: log_softmax(logits / T) of each next token, one unpadded row at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0] / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_token_logprobs_equal_hand_loop_and_ignore_left_padding(model_dir):
    model, _ = load_policy(model_dir)
    rows = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]
    ids = torch.tensor([rows[0], [3, 3, 3] + rows[1]])  # row 1 left-padded by 3 (pad id 3)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    got = token_logprobs(model, ids, mask, temperature=0.7)
    for row, (offset, tokens) in enumerate([(0, rows[0]), (3, rows[1])]):
        expected = unpadded_logprobs(model, tokens, temperature=0.7)
        # Position offset + t holds log p(token t | tokens <t); the first real token has no context.
        torch.testing.assert_close(got[row, offset + 1 :], torch.tensor(expected), atol=1e-5, rtol=0)
        assert got[row, : offset + 1].abs().sum() == 0
    # Chunking over rows changes nothing; a random 1.5k-token model gives ~ -ln(1536) = -7.3 per token.
    torch.testing.assert_close(token_logprobs(model, ids, mask, 0.7, chunk_size=1), got, atol=1e-6, rtol=0)
    assert -9 < got[0, 1:].mean() < -6
    # Skipping the prompt's logits keeps the scored columns and zeroes the rest; 0 is not a column.
    tail = token_logprobs(model, ids, mask, 0.7, first_scored=4)
    torch.testing.assert_close(tail[:, 4:], got[:, 4:], atol=1e-6, rtol=0)
    assert tail[:, :4].abs().sum() == 0
    with pytest.raises(ValueError, match="first_scored=0"):
        token_logprobs(model, ids, mask, 0.7, first_scored=0)


def test_generate_shapes_masks_ids_and_text(model_dir):
    worker = make_worker(model_dir, temperature=0.7)  # old log-probs must see the raw logits / T
    traj = worker.generate(PROMPTS)
    B, T = traj.input_ids.shape
    assert B == len(PROMPTS) * K and traj.policy_version == 0 and worker.version == 0
    assert traj.group_ids.tolist() == [5] * K + [7] * K
    assert traj.sample_ids.tolist() == [5 * K + j for j in range(K)] + [7 * K + j for j in range(K)]
    assert len(traj.prompts) == len(traj.responses) == len(traj.references) == B
    assert traj.references == ["5"] * K + [None] * K
    assert traj.prompts[0] == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"

    model, tokenizer = worker.model, worker.tokenizer
    lengths = traj.response_lengths.astype(int)
    P = T - lengths.max()  # prompt columns; at most max_new_tokens=6 response columns follow
    assert 1 <= lengths.min() and lengths.max() <= 6
    for i in range(B):
        real = traj.attention_mask[i].astype(bool)
        resp = traj.response_mask[i].astype(bool)
        # Left-padded prompt in columns < P, then a contiguous response from column P.
        assert np.flatnonzero(resp).tolist() == list(range(P, P + lengths[i]))
        assert real[:P].tolist() == sorted(real[:P].tolist()) and real[P - 1]
        assert np.array_equal(real[P:], resp[P:])
        prompt_ids = traj.input_ids[i][real & ~resp].tolist()
        assert tokenizer.decode(prompt_ids) == traj.prompts[i]
        assert tokenizer.decode(traj.input_ids[i][resp], skip_special_tokens=True) == traj.responses[i]
        # old log-probs (recorded while sampling): 0 outside the response, the unpadded hand loop inside it.
        assert (traj.old_logprobs[i][~resp] == 0).all()
        full = traj.input_ids[i][real].tolist()
        expected = unpadded_logprobs(model, full, temperature=0.7)[-int(resp.sum()) :]
        np.testing.assert_allclose(traj.old_logprobs[i][resp], expected, atol=1e-5)

    # Seeded: a fresh worker with the same settings repeats the first call; the next call samples something else.
    again = make_worker(model_dir, temperature=0.7).generate(PROMPTS)
    np.testing.assert_array_equal(again.input_ids, traj.input_ids)
    assert not np.array_equal(worker.generate(PROMPTS).input_ids, traj.input_ids)


def test_generate_greedy_truncation_and_raw_text(model_dir):
    worker = make_worker(model_dir, max_prompt_tokens=8, use_chat_template=False)
    long = Prompt(id=3, text="one two three four five six seven eight nine ten eleven twelve")
    greedy = worker.generate([long, PROMPTS[0]], greedy=True, max_new_tokens=3)
    assert greedy.input_ids.shape[0] == 2 and greedy.sample_ids.tolist() == [3, 5]  # k = 1: id * 1 + 0
    assert greedy.response_mask.sum(axis=1).max() <= 3
    full = worker.tokenizer(long.text).input_ids
    assert len(full) > 8
    kept = greedy.input_ids[0][(greedy.attention_mask[0] == 1) & (greedy.response_mask[0] == 0)]
    assert kept.tolist() == full[-8:]  # truncated from the left
    assert greedy.prompts[1] == "What is 2 plus 3?"  # raw text, no chat template
    np.testing.assert_array_equal(worker.generate([long, PROMPTS[0]], greedy=True, max_new_tokens=3).input_ids,
                                  greedy.input_ids)  # fmt: skip


def script_responses(monkeypatch, rows: list[list[int]]) -> None:
    """Make the engine pick these response tokens (one list per output row) instead of sampling;
    the recorded log-probs still come from the model's real logits at each step."""
    script = torch.tensor(rows)

    def choose(loop, running, scores, temperature, top_p):
        return script[[row.choice for row in running], [len(row.tokens) for row in running]]

    monkeypatch.setattr(DecodeLoop, "_choose", choose)


def responses_of_lengths(lengths: list[int], width: int, eos: int) -> list[list[int]]:
    """Distinct tokens, EOS last when shorter than width, then tokens a sampler could add (never read)."""
    return [[300 + 10 * i + t for t in range(n - 1)] + [eos if n < width else 399] + [400] * (width - n)
            for i, n in enumerate(lengths)]  # fmt: skip


def test_generate_cuts_the_response_after_the_first_eos(model_dir, monkeypatch):
    worker = make_worker(model_dir)
    eos, pad = worker.tokenizer.eos_token_id, worker.tokenizer.pad_token_id  # 2 and 3 in tiny-gpt2
    # Row 0 ends at its EOS (the script goes on after it, the worker must not); row 1 never ends.
    script_responses(monkeypatch, [[300, eos, 301, 302], [303, 304, 305, 306]])
    traj = worker.generate(PROMPTS, greedy=True, max_new_tokens=4)
    P = traj.input_ids.shape[1] - 4
    assert traj.input_ids[:, P:].tolist() == [[300, eos, pad, pad], [303, 304, 305, 306]]
    assert traj.response_mask[:, P:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert traj.attention_mask[:, P:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert traj.responses[0] == worker.tokenizer.decode([300])  # EOS is special: skipped in the text
    assert (traj.old_logprobs[0, P + 2 :] == 0).all() and (traj.old_logprobs[0, P : P + 2] < 0).all()
    # row 1 ran out of tokens without EOS: cut at the limit (the budget it was sampled with is recorded)
    assert traj.truncated.tolist() == [False, True] and traj.max_new_tokens == 4


def test_rows_that_end_leave_the_batch_and_the_others_keep_their_logprobs(model_dir, monkeypatch):
    """Sampled rows, but rows 1 and 4 are made to emit EOS at steps 2 and 4: they leave the decode
    batch (and its KV cache); every row's recorded log-probs must still equal a full forward pass."""
    worker = make_worker(model_dir, max_new_tokens=8)
    eos, sample = worker.tokenizer.eos_token_id, DecodeLoop._choose

    def choose(loop, running, scores, temperature, top_p):
        tokens = sample(loop, running, scores, temperature, top_p)
        for i, row in enumerate(running):
            if (row.choice, len(row.tokens)) in ((1, 2), (4, 4)):  # row 1 at its step 2, row 4 at its step 4
                tokens[i] = eos
        return tokens

    monkeypatch.setattr(DecodeLoop, "_choose", choose)
    traj = worker.generate(PROMPTS)
    assert traj.response_lengths[[1, 4]].tolist() == [3, 5]
    full = token_logprobs(worker.model, torch.from_numpy(traj.input_ids), torch.from_numpy(traj.attention_mask), 1.0)
    np.testing.assert_allclose(full.numpy() * traj.response_mask, traj.old_logprobs, atol=1e-5)


def test_load_weights_changes_outputs_and_checks_versions(model_dir):
    worker = make_worker(model_dir)
    before = worker.generate(PROMPTS[:1], greedy=True)
    state = Weights.from_state_dict(worker.model.state_dict()).arrays
    state["transformer.wte.weight"] *= 3.0  # sharper logits, so other log-probs; lm_head is tied
    state["lm_head.weight"] = state["transformer.wte.weight"]  # to it: a state dict has both names
    for array in state.values():
        array.setflags(write=False)  # as they arrive from Ray's object store
    dtypes = {k: "float32" for k in state}
    assert worker.load_weights(2, Weights(state, dtypes)) == 2 and worker.version == 2
    assert torch.equal(worker.model.transformer.wte.weight, torch.from_numpy(state["transformer.wte.weight"]))
    after = worker.generate(PROMPTS[:1], greedy=True)
    assert after.policy_version == 2
    assert not np.allclose(after.old_logprobs, before.old_logprobs)
    with pytest.raises(ValueError, match="version 1"):
        worker.load_weights(1, Weights(state, dtypes))
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        worker.load_weights(3, Weights({k: v for k, v in state.items() if k != "lm_head.weight"}, dtypes))
    assert worker.version == 2


def test_reference_equals_worker_old_logprobs_for_same_weights(model_dir):
    traj = make_worker(model_dir, temperature=1.0).generate(PROMPTS)
    ref = ReferencePolicy(model=model_dir, temperature=1.0, torch_threads=1).logprobs(traj)
    assert ref.dtype == np.float32 and ref.shape == traj.input_ids.shape
    np.testing.assert_allclose(ref, traj.old_logprobs, atol=1e-5)  # full pass vs KV-cached decode
    assert (ref[traj.response_mask == 0] == 0).all() and (ref[traj.response_mask == 1] < 0).all()
    # packed into rows of <= 16 tokens (several sequences per row), the LM head 5 positions at a time
    packed = ReferencePolicy(model=model_dir, temperature=1.0, torch_threads=1, pack_tokens=16, logits_chunk=5)
    np.testing.assert_allclose(packed.logprobs(traj), ref, atol=1e-5)
    # each group's prompt run once, its samples after it
    shared = ReferencePolicy(model=model_dir, temperature=1.0, torch_threads=1, pack_tokens=16, share_prompts=True)
    np.testing.assert_allclose(shared.logprobs(traj), ref, atol=1e-5)


# --- learner (one rank, ZeRO-2, in this process) -------------------------------------------


@pytest.fixture(scope="module")
def dist_env():
    """The learner sets rendezvous env vars and a process group that outlive it: undo both."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_learner(model_dir: str, name: str, lora: LoraConfig | None = None, pipeline: PipelineConfig | None = None,
                 micro_batch_size: int = 4, packing: bool = True, pack_tokens: int = 256, logits_chunk: int = 1024,
                 lr: float = 1e-2, zero_stage: int = 2, on_nonfinite: str = "stop", share_prompts: bool = False,
                 **algorithm_fields: Any):
    from rayrlhf.actors.learner import Learner

    algorithm = AlgorithmConfig(name=name, clip_eps=0.2, epochs=1, gamma=1.0, lam=0.95, value_clip=0.2, vf_coef=0.5,
                                entropy_coef=0.0, normalize_std=True, **algorithm_fields)  # fmt: skip
    kl = KLConfig(coef=0.05, estimator="k3", adaptive=False, target=0.1, horizon=1000)
    learner = LearnerConfig(num_ranks=1, zero_stage=zero_stage, offload=False, backend="auto", lr=lr, weight_decay=0.0,
                            grad_clip=1.0, micro_batch_size=micro_batch_size, bf16=False, num_cpus=1, num_gpus=0,
                            torch_threads=1, gradient_checkpointing=False, packing=packing, pack_tokens=pack_tokens,
                            logits_chunk=logits_chunk, on_nonfinite=on_nonfinite,
                            share_prompts=share_prompts)  # fmt: skip
    return Learner(
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), model=model_dir, seed=0,
        temperature=1.0, rows_per_step=len(PROMPTS) * K, algorithm=algorithm, kl=kl, learner=learner, lora=lora,
        pipeline=pipeline,
    )  # fmt: skip


LENGTHS = [2, 6, 4, 3, 5, 1, 6, 2]  # response lengths (EOS included) of the 2 groups of K=4


def test_learner_trains_a_batch_within_max_staleness_with_the_off_policy_loss(model_dir, dist_env, monkeypatch):
    from rayrlhf.actors.learner import StaleTrajectoryError

    worker = make_worker(model_dir)
    script_responses(monkeypatch, responses_of_lengths(LENGTHS, 6, worker.tokenizer.eos_token_id))
    traj = worker.generate(PROMPTS)  # policy version 0
    scores = np.array([1, 0, 0, 0] * len(PROMPTS), dtype=np.float32)
    batch = LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores, components={})], [None])
    learner = make_learner(model_dir, "grpo", pipeline=PipelineConfig(max_staleness=1, is_cap=1.5))
    fresh = learner.learn(batch)
    assert fresh["pipeline/staleness"] == 0 and fresh["pipeline/mismatch_kl"] < 1e-6 and fresh["pipeline/is_clip_frac"] == 0
    late = learner.learn(batch)  # the same samples, now one version old: accepted, and corrected for
    assert late["pipeline/staleness"] == 1 and late["version"] == 2
    assert late["pipeline/mismatch_kl"] > 1e-4 and 0 < late["pipeline/is_clip_frac"] < 1  # lr 1e-2 moved it far
    with pytest.raises(StaleTrajectoryError, match=r"accepts versions 1\.\.2 \(pipeline.max_staleness=1\)"):
        learner.learn(batch)
    assert learner.version == 2


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_learner_step_does_not_depend_on_the_micro_batch_size(model_dir, dist_env, monkeypatch, aggregation):
    """Uneven lengths (2..6 tokens): 2 micro-batches of 4 rows and 1 of 8 give the same loss and gradient;
    and so do padded rows, packed rows of 8 tokens with the LM head 3 positions at a time, and each
    group's prompt run once (share_prompts)."""
    worker = make_worker(model_dir)
    script_responses(monkeypatch, responses_of_lengths(LENGTHS, 6, worker.tokenizer.eos_token_id))
    traj = worker.generate(PROMPTS)
    scores = np.array([1, 0, 0, 0] * len(PROMPTS), dtype=np.float32)
    batch = LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores, components={})], [None])
    split, whole, padded, chunked, shared = (
        make_learner(model_dir, "grpo", loss_aggregation=aggregation, **settings).learn(batch)
        for settings in (dict(micro_batch_size=4), dict(micro_batch_size=8), dict(micro_batch_size=8, packing=False),
                         dict(micro_batch_size=4, pack_tokens=8, logits_chunk=3),
                         dict(micro_batch_size=4, packing=False, share_prompts=True, pack_tokens=8))
    )  # fmt: skip
    assert split["grad_norm"] > 0
    for other in (split, padded, chunked, shared):
        assert other["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
        assert other["pg_loss"] == pytest.approx(whole["pg_loss"], abs=1e-6)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_learner_step_sync_stale_and_save(model_dir, dist_env, tmp_path, monkeypatch, name):
    from rayrlhf.actors.learner import StaleTrajectoryError

    worker = make_worker(model_dir)
    script_responses(monkeypatch, responses_of_lengths(LENGTHS, 6, worker.tokenizer.eos_token_id))
    traj = worker.generate(PROMPTS)
    assert traj.response_lengths.tolist() == LENGTHS
    ref = ReferencePolicy(model=model_dir, temperature=1.0, torch_threads=1).logprobs(traj)
    scores = np.array([1, 0, 0, 0] * len(PROMPTS), dtype=np.float32)  # the first sample of each group wins
    learner = make_learner(model_dir, name)

    initial = learner.get_weights().arrays
    assert set(initial) == set(worker.model.state_dict())  # HF names: no value head, no DeepSpeed prefix
    metrics = learner.learn(LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores + 1, components={})], [ref]))

    assert learner.version == 1 and metrics["version"] == 1
    # Policy == reference == sampler before the single optimizer step (2 micro-batches, 1 step):
    # the learner's log-probs reproduce the rollout's, so nothing is clipped and the KL is 0.
    assert metrics["clip_frac"] == 0 and abs(metrics["kl"]) < 1e-6
    assert metrics["tokens"] == sum(LENGTHS) and metrics["response_length"] == sum(LENGTHS) / 8 and metrics["reward_mean"] == 1.25  # of raw_total
    assert metrics["kl_coef"] == 0.05 and metrics["grad_norm"] > 0
    if name == "grpo":
        # Group [1,0,0,0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5,
        # advantages [1.5, -0.5, -0.5, -0.5]. At ratio 1, pg_loss = -sum(A_i L_i) / sum(L_i) over the
        # step's 29 tokens (token-mean, whatever the micro-batches: one group each): lengths [2,6,4,3]
        # give sum(A_i L_i) = 3 - 6.5, [5,1,6,2] 7.5 - 4.5; -(-3.5 + 3) / 29 = 0.0172414.
        assert metrics["pg_loss"] == pytest.approx(0.0172414, abs=1e-5)
        assert metrics["loss"] == pytest.approx(metrics["pg_loss"], abs=1e-6)  # + 0.05 * KL, KL = 0
    else:
        # Zero-init value head: V = 0, and KL = 0, so GAE (gamma 1, lam 0.95) gives returns
        # score * 0.95^(L-1-t) on token t, nonzero only in the winning rows (lengths 2 and 5).
        # value loss = 0.5 * masked mean of returns^2 per micro-batch:
        # (1 + 0.95^2) / 15 / 2 = 0.063417; (1 + .95^2 + .95^4 + .95^6 + .95^8) / 14 / 2 = 0.146983.
        assert metrics["value_loss"] == pytest.approx((0.063417 + 0.146983) / 2, abs=1e-5)
        # The loss's value term is aggregated over the whole step like the policy loss (token-mean over
        # its 29 tokens, whatever the micro-batches): 0.5 * (2 * (1 + .95^2) + .95^4 + .95^6 + .95^8) / 29
        # = 0.103759, not the logged per-micro-batch mean above. Whitened advantages have mean 0 over
        # all 29 tokens, but not per micro-batch.
        assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + 0.5 * 0.103759, abs=1e-5)

    sent = learner.get_weights()
    weights = sent.arrays
    assert set(sent.dtypes.values()) == {"float32"}  # an fp32 learner sends fp32
    assert max(np.abs(weights[k] - initial[k]).max() for k in weights) > 1e-3  # the step moved weights
    synced = make_worker(model_dir)
    synced.load_weights(learner.version, sent)
    for key, value in synced.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[key])
    # The rewarded samples became more likely than the others.
    new = token_logprobs(
        synced.model, torch.from_numpy(traj.input_ids), torch.from_numpy(traj.attention_mask), 1.0
    ).numpy()
    gain = ((new - traj.old_logprobs) * traj.response_mask).sum(axis=1)
    assert gain[scores == 1].mean() > gain[scores == 0].mean()

    with pytest.raises(StaleTrajectoryError, match="version 0"):
        learner.learn(LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores + 1, components={})], [ref]))
    assert learner.version == 1

    saved = learner.save(Storage(tmp_path / "policy"))
    assert saved == str(tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[key])
    prompt = tokenizer("What is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt.input_ids.shape[1] + 3 or out[0, -1] == tokenizer.eos_token_id


def test_beam_search_eval_is_hf_beam_search(model_dir):
    worker = make_worker(model_dir)
    beams = worker.generate(PROMPTS, greedy=True, max_new_tokens=5, num_beams=3)
    assert len(beams) == len(PROMPTS) and (beams.old_logprobs == 0).all()  # not for training
    # the same prompts through HF's own beam search give the same answers
    ids, mask = worker._left_padded(PROMPTS)
    expected = worker.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=3,
                                     early_stopping=True, max_new_tokens=5)  # fmt: skip
    for row, sequence in enumerate(expected):
        answer = sequence[ids.shape[1]:]
        answer = answer[answer != worker.pad_id].tolist()
        assert beams.input_ids[row][beams.response_mask[row] == 1].tolist() == answer
    assert beams.max_new_tokens == 5 and len(beams.truncated) == len(PROMPTS)
    greedy = worker.generate(PROMPTS, greedy=True, max_new_tokens=5)
    assert not np.array_equal(greedy.input_ids, beams.input_ids)  # a 3-beam search finds other answers here
    with pytest.raises(ValueError, match="num_beams > 1 is for greedy"):
        worker.generate(PROMPTS, num_beams=2)


def scripted_batch(model_dir: str, monkeypatch) -> tuple[RolloutWorker, LearnerBatch]:
    """The learner test's batch: 2 groups of K with LENGTHS, the first sample of each group wins."""
    worker = make_worker(model_dir)
    script_responses(monkeypatch, responses_of_lengths(LENGTHS, 6, worker.tokenizer.eos_token_id))
    traj = worker.generate(PROMPTS)
    ref = ReferencePolicy(model=model_dir, temperature=1.0, torch_threads=1).logprobs(traj)
    scores = np.array([1, 0, 0, 0] * len(PROMPTS), dtype=np.float32)
    return worker, LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores, components={})], [ref])


def test_lora_learner_trains_adapters_only_and_syncs_merged_weights(model_dir, dist_env, tmp_path, monkeypatch):
    worker, batch = scripted_batch(model_dir, monkeypatch)
    learner = make_learner(model_dir, "grpo", lora=LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn"]))
    trainable = [name for name, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".lora_" in name for name in trainable)  # A and B of 2 layers

    initial = learner.get_weights().arrays  # B = 0: the merged weights are the base model's
    assert set(initial) == set(worker.model.state_dict())
    for key, value in worker.model.state_dict().items():
        np.testing.assert_array_equal(initial[key], value.numpy())
    metrics = learner.learn(batch)
    assert metrics["pg_loss"] == pytest.approx(0.0172414, abs=1e-5)  # the full model's hand value

    sent = learner.get_weights()
    weights = sent.arrays
    changed = {key for key in weights if not np.array_equal(weights[key], initial[key])}
    assert changed == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    worker.load_weights(learner.version, sent)  # the rollout takes merged weights by their HF names
    saved = learner.save(Storage(tmp_path / "lora"))  # merged: plain from_pretrained, no peft needed
    for key, value in AutoModelForCausalLM.from_pretrained(saved).state_dict().items():
        np.testing.assert_allclose(value.numpy(), weights[key], atol=1e-6)


def test_plain_engine_steps_like_deepspeed_zero2(model_dir, dist_env, monkeypatch):
    """One rank skips DeepSpeed; the update must be the one DeepSpeed's ZeRO-2 makes (accumulation
    over 2 micro-batches, clipping, AdamW)."""
    import rayrlhf.actors.learner as learner_module

    _, batch = scripted_batch(model_dir, monkeypatch)
    plain = make_learner(model_dir, "grpo")
    assert isinstance(plain.engine, learner_module.PlainEngine)
    plain_metrics = plain.learn(batch)
    monkeypatch.setattr(learner_module, "use_plain_engine", lambda world_size, learner: False)
    deepspeed = make_learner(model_dir, "grpo")
    assert not isinstance(deepspeed.engine, learner_module.PlainEngine)
    ds_metrics = deepspeed.learn(batch)
    for key in ("loss", "pg_loss", "kl", "grad_norm"):
        assert plain_metrics[key] == pytest.approx(ds_metrics[key], rel=1e-5, abs=1e-7)
    assert plain_metrics["grad_norm"] > 1.0  # clipping took part
    ours, theirs = plain.get_weights().arrays, deepspeed.get_weights().arrays
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6)


@pytest.mark.parametrize("engine", ["plain", "deepspeed"])
def test_a_pbt_perturbation_wins_over_the_restored_lr_and_kl_coefficient(
    model_dir, dist_env, tmp_path, monkeypatch, engine
):
    """A checkpoint trained with lr=1e-2, restored by a learner configured with lr=3e-3: the optimizer's
    lr is the checkpoint's (1e-2) on a plain resume, 3e-3 under a PBT override; so is the KL value."""
    import rayrlhf.actors.learner as learner_module

    _, batch = scripted_batch(model_dir, monkeypatch)
    if engine == "deepspeed":
        monkeypatch.setattr(learner_module, "use_plain_engine", lambda world_size, learner: False)
    trained = make_learner(model_dir, "grpo", lr=1e-2)
    assert trained.learn(batch)["lr"] == 1e-2
    state = trained.save_checkpoint(Storage(tmp_path / "ckpt")) | {"kl_coef": 0.07}  # an adaptive value that moved
    restored = make_learner(model_dir, "grpo", lr=3e-3)
    assert isinstance(restored.engine, learner_module.PlainEngine) == (engine == "plain")
    for overrides, lr, kl_coef in [(None, 1e-2, 0.07), ({"lr": 3e-3, "kl_coef": 0.2}, 3e-3, 0.2)]:
        restored.load_checkpoint(Storage(tmp_path / "ckpt"), state, overrides)
        assert [g["lr"] for g in restored.engine.optimizer.param_groups] == [lr]
        assert restored.kl_ctl.value == kl_coef


def poisoned_batch(model_dir: str, monkeypatch, poisoned: bool = True, version: int = 0) -> LearnerBatch:
    """The scripted batch (sampled at policy `version`) with NaN old log-probs in its first row (a NaN
    loss for its micro-batch)."""
    worker = make_worker(model_dir)
    worker.load_state_dict({"version": version, "calls": 0})
    script_responses(monkeypatch, responses_of_lengths(LENGTHS, 6, worker.tokenizer.eos_token_id))
    traj = worker.generate(PROMPTS)
    if poisoned:
        traj.old_logprobs[0] = np.where(traj.response_mask[0] > 0, np.nan, traj.old_logprobs[0])
    scores = np.array([1, 0, 0, 0] * len(PROMPTS), dtype=np.float32)
    return LearnerBatch.join([traj], [Rewards(total=scores, raw_total=scores, components={})], [None])


def test_a_non_finite_loss_stops_the_step_before_any_update_and_diverged_weights_are_never_sent(
    model_dir, dist_env, tmp_path, monkeypatch
):
    """A NaN in the batch makes the loss NaN: the learner raises naming the step and the rank before the
    backward pass, and still holds (and saves) the weights it had. Once an applied update diverged,
    it refuses to save or send weights at all."""
    from rayrlhf.actors.learner import NonFiniteError

    batch = poisoned_batch(model_dir, monkeypatch)
    learner = make_learner(model_dir, "grpo", micro_batch_size=len(PROMPTS) * K)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"step 1: the loss of micro-batch 0 is not finite on learner rank\(s\) \[0\]; "
                                             r"no update of this step was applied"):
        learner.learn(batch)
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert learner.version == 0 and learner.get_weights() is not None  # the last finite state is still there
    learner.save_checkpoint(Storage(tmp_path / "ok"))

    with pytest.raises(NonFiniteError, match="an update of this step was applied"):
        learner._finite(float("inf"), "the gradient norm", applied=True)  # an update of the step was applied
    for send in (learner.get_weights, lambda: learner.save_checkpoint(Storage(tmp_path / "bad"))):
        with pytest.raises(NonFiniteError, match="refusing to save or send diverged weights"):
            send()
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("engine", ["plain", "zero2"])
def test_on_nonfinite_skip_drops_the_update_and_the_run_trains_on(model_dir, dist_env, monkeypatch, capsys, engine):
    """learner.on_nonfinite: skip. The NaN row is in the first of the step's 2 micro-batches (one
    accumulation window): the whole window's update is dropped (the plain engine and DeepSpeed 0.19's
    ZeRO-2 drop a non-finite gradient themselves), counted and logged once; the step's loss is the
    finite micro-batch's. The next, clean step trains as usual. DeepSpeed's ZeRO-0 in fp32, which
    would apply it, is refused by the config."""
    import rayrlhf.actors.learner as learner_module

    with pytest.raises(ValueError, match="on_nonfinite: skip needs learner.zero_stage >= 1 with several ranks"):
        LearnerConfig(num_ranks=2, zero_stage=0, on_nonfinite="skip")
    if engine != "plain":
        monkeypatch.setattr(learner_module, "use_plain_engine", lambda world_size, learner: False)
    learner = make_learner(model_dir, "grpo", on_nonfinite="skip")
    assert isinstance(learner.engine, learner_module.PlainEngine) == (engine == "plain")
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    metrics = learner.learn(poisoned_batch(model_dir, monkeypatch))
    assert metrics["skipped_updates"] == 1.0 and np.isnan(metrics["grad_norm"]) and np.isfinite(metrics["loss"])
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert learner.version == 1 and learner.get_weights() is not None  # the step happened; its weights are sendable
    logged = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert logged == ["WARNING step 1: the loss of micro-batch 0 is not finite on learner rank(s) [0]; its update "
                      "is skipped (learner.on_nonfinite: skip)"]
    metrics = learner.learn(poisoned_batch(model_dir, monkeypatch, poisoned=False, version=1))
    assert metrics["skipped_updates"] == 0.0 and np.isfinite(metrics["grad_norm"]) and learner.version == 2
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
