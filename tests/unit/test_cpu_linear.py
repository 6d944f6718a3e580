"""Linear layers on oneDNN's packed GEMM: same outputs and gradients as F.linear, fresh after weights
change (in place, or by a fused optimizer step)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.actors.runtime import cpu_linear
from rayrlhf.actors.runtime.cpu_linear import PackedLinear, onednn_available, pack_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def llama(width: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture
def wide_enough(monkeypatch):
    monkeypatch.setattr(cpu_linear, "PACK_MIN_WIDTH", 1)


IDS = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_packed_layers_give_the_plain_logits(wide_enough):
    plain, packed = llama(), llama()
    assert pack_linears(packed) == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert type(packed.lm_head) is PackedLinear and type(plain.lm_head) is torch.nn.Linear
    assert torch.allclose(logits(packed), logits(plain), atol=1e-5)
    with torch.inference_mode():  # the reward scorer's mode
        assert torch.allclose(packed(input_ids=IDS).logits, logits(plain), atol=1e-5)


def test_a_weight_written_in_place_is_packed_again(wide_enough):
    model = llama()
    pack_linears(model)
    before = logits(model)
    other = llama()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())  # a weight sync: copy_ into the same tensors
    after = logits(model)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, logits(other), atol=1e-5)


def test_an_optimizer_step_is_seen(wide_enough):
    """Fused AdamW writes the weights without moving their versions: the named optimizer's steps drop the packs."""
    plain, packed = llama(), llama()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (plain, packed)]
    pack_linears(packed, optimizers[1])
    for _ in range(2):
        for model, optimizer in zip((plain, packed), optimizers):
            model(input_ids=IDS).logits.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.allclose(logits(packed), logits(plain), atol=1e-4)


def test_gradients_equal_the_plain_ones(wide_enough):
    plain, packed = llama(), llama()
    pack_linears(packed)
    for model in (plain, packed):
        model.model.embed_tokens.weight.requires_grad_(False)  # the input's gradient then starts at a packed layer
        model(input_ids=IDS).logits.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert plain.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 1e-4  # not all zero
    assert packed.model.layers[0].mlp.down_proj._pack.weight is not None  # the packed forward ran


def test_frozen_weights_pass_the_inputs_gradient(wide_enough):
    """LoRA's base layers: the weight takes no gradient, the input does."""
    layer = torch.nn.Linear(8, 5)
    reference = copy.deepcopy(layer).requires_grad_(False)
    pack_linears(layer)
    layer.requires_grad_(False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (layer(x) * torch.arange(5.0)).sum().backward()
    (reference(x2) * torch.arange(5.0)).sum().backward()
    assert layer.weight.grad is None and torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_a_deep_copy_computes_with_its_own_weights(wide_enough):
    model = llama()
    pack_linears(model)
    expected = logits(model)
    twin = copy.deepcopy(model)
    assert pickle.loads(pickle.dumps(model)).lm_head._pack.weight is None  # packed tensors are not copied
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    assert torch.count_nonzero(logits(twin)) == 0
    assert torch.allclose(logits(model), expected, atol=0)


def test_narrow_or_half_precision_layers_are_left_alone():
    assert pack_linears(llama()) == 0  # width 64 < PACK_MIN_WIDTH
    assert pack_linears(llama(256).to(torch.bfloat16)) == 0
