"""The decode state of the rows in flight: one KV cache whose rows are left-padded to a common length.

Continuous batching needs rows to come and go between decode steps. A row joins with the cache
of its own prefill; caches of different lengths are stacked by padding the shorter ones on the
left (masked out, so the padding changes nothing a row attends to). A row that finishes is
dropped at once, and padding columns that no remaining row needs are trimmed, so the batch is
never longer than its longest row. Positions are counted per row, so a row's tokens sit at the
same positions whatever it is batched with.

The keys and values live in buffers with spare columns on the right (`RoomyLayer`): a decode step
writes its token in place, where transformers' DynamicLayer copies the whole cache (torch.cat) at
every step. The batch is copied only when rows join, or every ROOM steps; rows that leave are
compacted inside the same buffers (and trimmed columns are only skipped), so no buffer is
allocated or zeroed then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 64
"""Spare columns a layer's buffers get each time they are (re)allocated."""


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad t on the left of dimension dim (counted from the end) up to width."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _stacked(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """parts [rows_i, heads, length_i, dim] stacked on rows, each right-aligned (zeros on the left, masked)
    in a buffer of width + ROOM columns: one copy of each part. The spare columns are left as they are
    (uninitialised): a step writes each before any view covers it."""
    rows = sum(p.shape[0] for p in parts)
    heads, _, dim = parts[0].shape[1:]
    out = parts[0].new_empty(rows, heads, width + ROOM, dim)
    start = 0
    for p in parts:
        pad = width - p.shape[2]
        out[start:start + p.shape[0], :, :pad] = 0  # finite, for the masked attention to weigh by 0
        out[start:start + p.shape[0], :, pad:width] = p
        start += p.shape[0]
    return out


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of columns [start, end) of the first rows of larger
    buffers: `update` writes new tokens into the spare columns (re-allocating ROOM more when they run
    out), `keep` compacts the rows that stay in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys, self._values = keys, values
        self.start = 0
        self._view(keys.shape[0], length)
        self.device, self.is_initialized = keys.device, True

    def _view(self, rows: int, end: int) -> None:
        self.keys, self.values = self._keys[:rows, :, self.start:end], self._values[:rows, :, self.start:end]
        self._viewed = self.keys.data_ptr()

    def update(self, key_states, value_states, *args, **kwargs):
        rows, length, new = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        if self.start + length + new > self._keys.shape[-2] or self.keys.data_ptr() != self._viewed:  # full, or replaced
            self.__init__(_stacked([self.keys], length), _stacked([self.values], length), length)
        end = self.start + length
        self._keys[:rows, :, end:end + new] = key_states
        self._values[:rows, :, end:end + new] = value_states
        self._view(rows, end + new)
        return self.keys, self.values

    def keep(self, index: torch.Tensor, first: int) -> None:
        """Keep the rows `index` (in that order) as the first rows, and drop the first `first` columns."""
        end = self.start + self.keys.shape[-2]
        self._keys[:len(index), :, self.start:end] = self.keys[index]  # gathered into a new tensor first
        self._values[:len(index), :, self.start:end] = self.values[index]
        self.start += first
        self._view(len(index), end)


def _roomy_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [RoomyLayer(k, v, length) for k, v in layers]
    return cache


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
        width = max(self.mask.shape[1], mask.shape[1])
        sources = [cache] if len(self) == 0 else [self.cache, cache]
        layers = [  # per layer: (keys, values, ...) of each source
            (_stacked([kv[0] for kv in layer], width), _stacked([kv[1] for kv in layer], width))
            for layer in zip(*sources)
        ]
        self.cache = _roomy_cache(layers, width)
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
        for layer in self.cache.layers:
            layer.keep(index, first)

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
