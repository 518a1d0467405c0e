"""A preallocated key/value cache: fixed shapes, written in place by position (gpt-fast style)."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)  # (B, nh, S, hs)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache of rows `rows` (default all), as views: (B, nh, S, hs) each."""
        return (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])

    def select_rows_(self, index: torch.Tensor, upto: int | None = None) -> None:
        """Row i of the cache becomes what row index[i] holds (index (B,), any order, repeats allowed), in
        slots 0..upto-1 (default all: slots past the filled ones need no copy), in place so that the buffers
        keep their addresses (CUDA graphs read them): beam and contrastive search move each kept hypothesis's
        keys and values to the rows that continue it."""
        for c in (self.k, self.v):
            c = c[:, :, :upto]  # (B, nh, upto, hs), a view
            c.copy_(c.index_select(0, index))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice | None = None, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at each row's own positions input_pos (B, T), into cache rows `rows`
        (default all); returns those rows of the cache, (B, nh, S, hs). `start` says every row's positions
        are start..start+T-1, which a plain slice copy writes faster than a scatter."""
        ck, cv = self.rows(rows)  # views: writes land in the cache
        if start is not None:
            T = k.shape[2]
            ck[:, :, start:start + T].copy_(k)
            cv[:, :, start:start + T].copy_(v)
            return ck, cv
        idx = input_pos[:, None, :, None].expand_as(k)
        ck.scatter_(2, idx, k)
        cv.scatter_(2, idx, v)
        return ck, cv
