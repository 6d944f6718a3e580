"""Linear layers on oneDNN's packed GEMM: same outputs as F.linear, fresh after weights change, plain
path under autograd."""

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


def test_autograd_takes_the_plain_path(wide_enough):
    model = llama()
    pack_linears(model)
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.model.layers[0].mlp.down_proj._pack.weight is None  # never packed: every call recorded


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
