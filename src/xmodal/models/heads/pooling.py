"""Pooling heads: a set of token vectors ``(B, N, D)`` to one vector ``(B, D)``.

Every head takes ``forward(tokens, mask=None)`` where ``mask`` is either a boolean
``(B, N)`` padding mask (True = real token) or integer lengths ``(B,)`` (the first
``lengths[b]`` tokens of row ``b`` are real). Rows without any real token pool to zeros.

Registered in :data:`xmodal.models.base.POOLING`: ``mean``, ``max`` and ``gpo`` (the
Generalized Pooling Operator of VSE-infinity, Chen et al., CVPR 2021).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ...errors import ConfigError
from ..base import POOLING


def as_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Return a boolean ``(B, N)`` mask from a mask, integer lengths ``(B,)`` or None."""
    B, N = tokens.shape[:2]
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=tokens.device)
    if mask.dim() == 1:  # lengths
        positions = torch.arange(N, device=tokens.device)  # (N,)
        return positions.unsqueeze(0) < mask.to(tokens.device).long().unsqueeze(1)  # (B, N)
    if mask.shape != (B, N):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {(B, N)}")
    return mask.to(device=tokens.device, dtype=torch.bool)


@POOLING.register("mean")
class MeanPool(nn.Module):
    """Average of the real tokens."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = as_mask(mask, tokens).unsqueeze(-1).to(tokens.dtype)  # (B, N, 1)
        total = (tokens * m).sum(dim=1)  # (B, D)
        return total / m.sum(dim=1).clamp(min=1.0)


@POOLING.register("max")
class MaxPool(nn.Module):
    """Per-dimension maximum over the real tokens."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = as_mask(mask, tokens)
        filled = tokens.masked_fill(~m.unsqueeze(-1), float("-inf"))
        out = filled.max(dim=1).values  # (B, D)
        # an all-padding row would give -inf; pool it to zeros like the other heads
        return out.masked_fill(~m.any(dim=1, keepdim=True), 0.0)


def positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    """Sinusoidal position encoding ``(length, d_model)`` (Vaswani et al.)."""
    if d_model % 2 != 0:
        raise ConfigError(f"gpo: d_pe must be even for sin/cos encodings, got {d_model}")
    pe = torch.zeros(length, d_model)
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)  # (L, 1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


@POOLING.register("gpo")
class GPO(nn.Module):
    """Generalized Pooling Operator (VSE-infinity).

    Each feature dimension is sorted in descending order over the real tokens, and
    the pooled value is a weighted sum of the sorted values. The weights depend only
    on the *rank* and the number of tokens: a bidirectional GRU reads the sinusoidal
    encodings of ranks ``0..n-1``, the two directions are averaged, a linear layer
    scores each rank and a softmax with temperature 0.1 turns scores into weights.
    Sorting makes the result invariant to token order; padding never enters the sort
    or the GRU (packed sequences), so results do not depend on how much padding a batch has.
    """

    def __init__(self, dim: int | None = None, d_pe: int = 32, d_hidden: int = 32,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self._pe_cache: dict[int, torch.Tensor] = {}

    def _pe(self, length: int) -> torch.Tensor:
        if length not in self._pe_cache:
            self._pe_cache[length] = positional_encoding_1d(self.d_pe, length)
        return self._pe_cache[length]

    def compute_pool_weights(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Weights ``(B, max_len, 1)`` over sorted positions for rows of the given lengths."""
        B = lengths.shape[0]
        device = lengths.device
        pes = self._pe(max_len).to(device=device, dtype=self.linear.weight.dtype)
        pes = pes.unsqueeze(0).expand(B, max_len, self.d_pe)  # (B, L, d_pe)
        valid = torch.arange(max_len, device=device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        pes = pes.masked_fill(~valid.unsqueeze(-1), 0.0)
        # pack_padded_sequence refuses zero lengths; such rows are all padding and pool to 0 anyway
        packed = pack_padded_sequence(pes, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # (B, L, 2H)
        out = (out[:, :, : self.d_hidden] + out[:, :, self.d_hidden:]) / 2  # (B, L, H)
        scores = self.linear(out)  # (B, L, 1)
        scores = scores.masked_fill(~valid.unsqueeze(-1), -10000.0)
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        m = as_mask(mask, tokens)  # (B, N)
        lengths = m.sum(dim=1)  # (B,)
        max_len = max(int(lengths.max()), 1)
        weights = self.compute_pool_weights(lengths, max_len)  # (B, L, 1)
        # padding sorts last (-inf) wherever it sits in the row, so the first `length`
        # sorted positions are exactly the real tokens, even for non-prefix masks
        filled = tokens.masked_fill(~m.unsqueeze(-1), float("-inf"))
        sorted_tokens = filled.sort(dim=1, descending=True).values[:, :max_len]  # (B, L, D)
        valid = torch.arange(max_len, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        sorted_tokens = sorted_tokens.masked_fill(~valid.unsqueeze(-1), 0.0)
        pooled = (sorted_tokens * weights).sum(dim=1)  # (B, D)
        if return_weights:
            return pooled, weights.squeeze(-1)
        return pooled


def create_pooling(name: str, **kwargs: object) -> nn.Module:
    """Build a registered pooling head by name (``mean``, ``max``, ``gpo``)."""
    return POOLING.create(name, **kwargs)


def list_pooling() -> list[str]:
    """Names of the registered pooling heads."""
    return POOLING.names()
