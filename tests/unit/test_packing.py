"""Packed forward passes and the chunked LM head (actors/rl/packing.py, actors/rl/logprobs.py).

Both must change nothing but the cost: the log-probs, entropies, the loss of every aggregation and
each parameter's gradient equal those of the padded batch through the stock model (full logits).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.actors.rl.advantages import expand_to_tokens, grpo_advantages
from rayrlhf.actors.rl.algorithms import LOSS_AGGREGATIONS
from rayrlhf.actors.rl.logprobs import head_logprobs, policy_forward, position_ids, scored_positions
from rayrlhf.actors.rl.losses import entropy_from_logits
from rayrlhf.actors.rl.objective import Objective
from rayrlhf.actors.rl.packing import bins, packed_layout, shared_prompt_layout
from rayrlhf.actors.rl.token_batch import TokenBatch
from rayrlhf.actors.runtime.models import load_policy
from rayrlhf.jobs.config.run import AlgorithmConfig

# Three rows as a step lays them out: left-padded prompts (pad id 0), right-padded responses.
IDS = torch.tensor([
    [0, 0, 5, 6, 7, 8, 9, 0],
    [11, 12, 13, 14, 15, 16, 17, 18],
    [0, 21, 22, 23, 24, 0, 0, 0],
])  # fmt: skip
MASK = (torch.arange(8) >= torch.tensor([[2], [0], [1]])) & (torch.arange(8) < torch.tensor([[7], [8], [5]]))
# Four rows whose responses start at column 4: rows 0, 1 and 3 share the prompt 5 6 7, row 2 has its own.
SHARED_IDS = torch.tensor([
    [0, 5, 6, 7, 8, 9, 10, 0],
    [0, 5, 6, 7, 11, 0, 0, 0],
    [21, 22, 23, 24, 25, 26, 27, 28],
    [0, 5, 6, 7, 12, 13, 0, 0],
])  # fmt: skip
SHARED_MASK = (torch.arange(8) >= torch.tensor([[1], [1], [0], [1]])) & (
    torch.arange(8) < torch.tensor([[7], [5], [8], [6]])
)


def test_bins_balance_ceil_total_over_budget_rows_longest_first():
    assert bins([3, 5, 2, 4], budget=7) == [[1, 2], [3, 0]]
    assert bins([9, 1], budget=4) == [[0], [1]]  # 3 rows by the budget, but only 2 sequences
    assert bins([4, 4, 4, 4, 4], budget=8) == [[0, 3], [1, 4], [2]]


def test_packed_layout_restarts_positions_and_maps_every_token_back():
    layout = packed_layout(IDS, MASK.long(), budget=10)
    # lengths 5, 8, 4 in 2 rows: [row 1] then [row 0 + row 2] (5 < 8), each padded to 9 tokens
    assert layout.attention_mask is None
    assert layout.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 17, 18, 0], [5, 6, 7, 8, 9, 21, 22, 23, 24]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0], [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert (IDS.reshape(-1)[layout.source] == layout.input_ids.reshape(-1)[layout.target]).all()
    assert len(layout.source) == MASK.sum()


def test_shared_prompt_layout_runs_each_prompt_once_and_each_row_sees_only_it_and_itself():
    layout = shared_prompt_layout(SHARED_IDS, SHARED_MASK.long(), prefix_end=4, budget=10)
    # segments: prompt 5 6 7 then rows 0, 1, 3 (3 + 3 + 1 + 2 = 9 tokens); row 2 alone (8): one row each
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0]]
    mask = layout.attention_mask
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    attends = [row.nonzero().squeeze(-1).tolist() for row in mask[0, 0]]
    assert attends[2] == [0, 1, 2]  # the prompt: causal within itself
    assert attends[5] == [0, 1, 2, 3, 4, 5]  # row 0's last token: the prompt and row 0
    assert attends[6] == [0, 1, 2, 6]  # row 1's token: the prompt and itself, not row 0
    assert attends[8] == [0, 1, 2, 7, 8]  # row 3's second token
    assert mask[1, 0].tril().eq(mask[1, 0]).all() and mask[1, 0, 8].tolist() == [False] * 8 + [True]  # tail alone
    # every real token of every row reads its value from the model's rows; the prompt copy three times
    assert len(layout.source) == SHARED_MASK.sum() and len(layout.target.unique()) == 17
    assert (SHARED_IDS.reshape(-1)[layout.source] == layout.input_ids.reshape(-1)[layout.target]).all()


def tiny_llama(attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)  # fmt: skip
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-eager"])
def model(request, tiny_dir):
    if request.param == "gpt2":
        return load_policy(tiny_dir)[0]
    return tiny_llama("eager" if request.param == "llama-eager" else "sdpa")


def stock_forward(model, temperature: float, ids=IDS, mask=MASK) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded batch through the model's own forward with every position's logits: [B, T] each."""
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask.long())).logits
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = entropy_from_logits(logits[:, :-1] / temperature)
    scored = scored_positions(mask)
    pad = torch.zeros(len(ids), 1)
    return torch.where(scored, torch.cat([pad, logp], 1), 0.0), torch.where(scored, torch.cat([pad, entropy], 1), 0.0)


@pytest.mark.parametrize("pack_tokens", [None, 9, 64])
def test_packed_and_chunked_forward_equals_the_stock_padded_one(model, pack_tokens):
    with torch.no_grad():
        want_logp, want_entropy = stock_forward(model, 0.7)
        out = policy_forward(model, IDS, MASK.long(), 0.7, with_entropy=True, with_hidden=True,
                             pack_tokens=pack_tokens, logits_chunk=4)  # fmt: skip
    torch.testing.assert_close(out.logprobs, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, want_entropy, atol=1e-5, rtol=0)
    assert out.hidden.shape == (3, 8, model.config.hidden_size)
    assert (out.hidden.abs().sum(-1) > 0).eq(scored_positions(MASK)).all()


@pytest.mark.parametrize("pack_tokens", [10, 64])
def test_shared_prompt_forward_equals_the_stock_padded_one(model, pack_tokens):
    with torch.no_grad():
        want_logp, want_entropy = stock_forward(model, 0.7, SHARED_IDS, SHARED_MASK)
        out = policy_forward(model, SHARED_IDS, SHARED_MASK.long(), 0.7, with_entropy=True, with_hidden=True,
                             first_scored=4, pack_tokens=pack_tokens, share_prompts=True, logits_chunk=4)  # fmt: skip
    scored = scored_positions(SHARED_MASK) & (torch.arange(8) >= 4)
    torch.testing.assert_close(out.logprobs, torch.where(scored, want_logp, 0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, torch.where(scored, want_entropy, 0.0), atol=1e-5, rtol=0)
    assert (out.hidden.abs().sum(-1) > 0).eq(scored).all()
    with pytest.raises(ValueError, match="share_prompts runs packed rows: it needs pack_tokens"):
        policy_forward(model, SHARED_IDS, SHARED_MASK.long(), 0.7, first_scored=4, share_prompts=True)


def token_batch(ids=IDS, mask=MASK, scores=(1.0, 0.0, 0.5), groups=(0, 0, 0), seed=1) -> TokenBatch:
    """The rows as a learner step sees them, responses from column 4 on."""
    scores, groups = torch.tensor(scores), torch.tensor(groups)
    response = (mask & (torch.arange(8) >= 4)).float()
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(
        input_ids=ids, attention_mask=mask.long(), response_mask=response,
        old_logprobs=-4 - torch.rand(len(ids), 8, generator=g), scores=scores, group_ids=groups,
        ref_logprobs=-4 - torch.rand(len(ids), 8, generator=g),
        advantages=expand_to_tokens(grpo_advantages(scores, groups, True), response),
    )  # fmt: skip


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


LAYOUTS = {  # batch, and how policy_forward lays it out
    # several sequences per packed row, the LM head 2 positions at a time (so the recomputation runs)
    "packed": (token_batch(), dict(pack_tokens=9, logits_chunk=2)),
    # the prompt's one copy gets the gradient of all three rows that read it, as their padded copies do
    "shared": (token_batch(SHARED_IDS, SHARED_MASK, (1.0, 0.0, 0.3, 0.5), (0, 0, 1, 0), seed=2),
               dict(pack_tokens=10, share_prompts=True, logits_chunk=3)),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
def test_packed_and_shared_loss_and_gradients_equal_the_padded_ones(model, aggregation, layout):
    batch, options = LAYOUTS[layout]
    algo = AlgorithmConfig(loss_aggregation=aggregation, loss_scale_tokens=8, entropy_coef=0.01)
    objective = Objective(algo, "k3", None)
    logp, entropy = stock_forward(model, 0.7, batch.input_ids, batch.attention_mask.bool())
    want_loss, _ = objective(batch, logp, entropy, None, logp.detach(), kl_coef=0.1)
    want = gradients(model, want_loss)
    out = policy_forward(model, batch.input_ids, batch.attention_mask, 0.7, with_entropy=True, first_scored=4,
                         **options)  # fmt: skip
    loss, _ = objective(batch, out.logprobs, out.entropy, None, out.logprobs.detach(), kl_coef=0.1)
    got = gradients(model, loss)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=0)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operator returns while active (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_chunked_head_equals_unchunked_and_its_memory_stays_flat():
    torch.manual_seed(0)
    vocab, width, chunk = 500, 4, 8  # the head weight (vocab x width) is smaller than a chunk
    head = torch.nn.Linear(width, vocab, bias=False)
    largest = {}
    for positions in (4 * chunk, 16 * chunk):
        hidden = torch.randn(positions, width, requires_grad=True)
        tokens = torch.randint(vocab, (positions,))
        results = {}
        for size in (chunk, positions):
            head.zero_grad()
            hidden.grad = None
            with LargestTensor() as mode:
                logp, entropy = head_logprobs(head, hidden, tokens, 0.7, size, with_entropy=True)
                (logp.sum() + entropy.sum()).backward()
            results[size] = (logp, entropy, hidden.grad.clone(), head.weight.grad.clone())
            largest[positions, size] = mode.numel
        for chunked, whole in zip(results[chunk], results[positions]):
            torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # chunked: one chunk's logits at most, whatever the length; whole: all positions' logits at once
    assert largest[4 * chunk, chunk] == largest[16 * chunk, chunk] == chunk * vocab
    assert largest[16 * chunk, 16 * chunk] == 16 * chunk * vocab
