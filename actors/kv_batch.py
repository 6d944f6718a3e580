"""The decode state of the rows in flight: one KV cache whose rows are left-padded to a common length.

Continuous batching needs rows to come and go between decode steps. A row joins with the cache
of its own prefill; caches of different lengths are stacked by padding the shorter ones on the
left (masked out, so the padding changes nothing a row attends to). A row that finishes is
dropped at once, and padding columns that no remaining row needs are trimmed, so the batch is
never longer than its longest row. Positions are counted per row, so a row's tokens sit at the
same positions whatever it is batched with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad t on the left of dimension dim (counted from the end) up to width."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


class KVBatch:
    """Rows in flight: cache [rows, heads, length, dim] per layer, mask [rows, length], next inputs."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        """The position of each row's next input token."""
        self.next_ids = torch.zeros(0, dtype=torch.long)
        """The token each row feeds at the next step (its last sampled one)."""

    def __len__(self) -> int:
        return self.mask.shape[0]

    def join(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Add rows (a prefill's cache and mask, their next positions and tokens) to the batch."""
        if len(self) == 0:
            self.cache, self.mask, self.positions, self.next_ids = cache, mask, positions, next_ids
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = [
            tuple(torch.cat([_left_pad(a, width, -2), _left_pad(b, width, -2)]) for a, b in ((ka, kb), (va, vb)))
            for (ka, va, *_), (kb, vb, *_) in zip(self.cache, cache)
        ]
        self.cache = DynamicCache(layers)
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.next_ids = torch.cat([self.next_ids, next_ids])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), and drop the padding columns none of them needs."""
        if rows == list(range(len(self))):
            return
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        first = int(self.mask.any(dim=0).int().argmax())  # the first column some row attends to
        self.mask = self.mask[:, first:]
        self.cache = DynamicCache([(k[index, :, first:], v[index, :, first:]) for k, v, *_ in self.cache])

    def inputs(self) -> dict[str, torch.Tensor | DynamicCache]:
        """The next decode step's model inputs: one token per row, the mask grown by one column."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return {
            "input_ids": self.next_ids[:, None], "attention_mask": self.mask,
            "position_ids": self.positions[:, None], "cache": self.cache,
        }

    def advance(self, cache: DynamicCache, tokens: torch.Tensor) -> None:
        """After a decode step: its cache, and the sampled tokens as the next inputs."""
        self.cache, self.next_ids = cache, tokens
        self.positions = self.positions + 1
