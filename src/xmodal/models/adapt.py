"""ADAPT: adaptive cross-modal embeddings (Wehrmann, Kolling & Barros, AAAI 2020).

A pair scorer: the vector of one modality rescales and shifts, channel by channel, the
token features of the other modality before they are pooled, so every (image, caption)
pair gets its own image (or caption) vector. Faithful to ``jwehrmann/retrieval.pytorch``:

- **Encoders** (``img_enc: simple``, ``txt_enc: gru_glove``): regions are projected by a
  linear layer (the ``features`` image tower), then ``LeakyReLU(0.1)`` and L2-normalised
  per region; words come from a text tower (``bigru``: word embeddings + BiGRU, mean of the
  two directions) and are L2-normalised per word. Configure the ``features`` tower with
  ``normalize: false`` so the activation comes before the normalisation, as in the original.
- **ADAPT-T2I** (``AdaptiveEmbeddingT2I``): regions go through ``BatchNorm1d`` without
  affine parameters (statistics over the batch's regions); the caption vector ``c`` (mean of
  its words) gives ``gamma = W_g c + b_g`` and ``beta = W_b c + b_b`` (one linear layer
  each); regions are adapted as ``a = x * (gamma + 1) + beta``; **Fovea** weights them with
  ``softmax_r(smooth * a)`` per channel (``smooth`` = 10), ``v = mean_r(p * a)``; the score
  is ``cos(v, c)``.
- **ADAPT-I2T** (``AdaptiveEmbeddingI2T``): the symmetric construction over the caption's
  BatchNorm-ed words, conditioned on the image vector (mean of its regions), pooled with a
  **max** over words, scored by cosine with the image vector.
- **ADAPT-Ens**: the two models are trained separately and their score matrices averaged
  at test time (the paper's ensemble). Here ``variant: ens`` loads two finished runs
  (``members``) into :class:`AdaptEnsemble`.

Deviations, on purpose: padding is masked (the original lets padded words into the
BatchNorm statistics, the softmax and the max, and truncates captions to 34 words); the
Fovea mean is taken over real tokens only (a constant factor per pair, so the cosine is
unchanged for unpadded inputs).

**Exact and fast scoring.** ``softmax_r(smooth * (s x_r + b))`` does not depend on ``b``,
so with ``k = smooth * s`` the pooled vector is ``v = s * E_p[x] + b`` where
``E_p[x] = sum_r e_r x_r / sum_r e_r`` and ``e_r = exp(k (x_r - x_ext))``; ``x_ext`` is the
largest region value when ``k > 0`` (smallest otherwise), so no exponent is positive. The
work per pair and channel is one pass over the regions (an exp and two multiply-adds).
On CPU in float32 that pass is a hand-written C kernel (``kernels/adapt.c`` through
:mod:`.adapt_native`: register-blocked channels, a float32-exact exponential cheaper than the
library's, compiled at first use with ``-march=native``); elsewhere, or without a C compiler,
it is fused by :func:`torch.compile` into one loop (falling back to chunked eager ops), with
the regions of an image kept in cache while all captions of a block pass.
The conditioning side's ``[gamma + 1, beta, unit vector]`` is part of its representation,
computed once per caption (T2I) or image (I2T). ``fused``: ``auto`` (the C kernels where they
apply, else :func:`torch.compile` once a call is large enough to repay the seconds compilation
costs, ``AUTO_COMPILE_MIN_WORK``), ``native`` (the C kernels or an error saying why not),
``compile`` or ``eager``.
Training goes through one custom autograd function for both directions (:class:`_AdaptScore`;
:class:`~.adapt_native.NativeAdaptScore` for the C kernels, which also skip pairs whose loss
gradient is zero)
that fuses the whole score, Fovea to cosine, with its analytic gradient (T2I:
``dE_p[x]/dk = Var_p[x]``, ``dE_p[x]/dx_r = p_r (1 + k (x_r - E_p[x]))``; I2T: the arg-max
word's terms, see :func:`_i2t_train_bwd`): the forward keeps three ``(Ni, Nt, D)``
statistics, the backward recomputes ``exp`` once, so memory is ``O(Ni * Nt * D)`` instead of
``O(Ni * Nt * R * D)``; tokens are processed in chunks sorted by length and trimmed to the
chunk's longest item, so padding (a text cache is padded to its longest caption) costs nothing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, XmodalError
from . import adapt_native
from .base import MODEL_ARGS, MODELS, FrozenTowers, PairScorer, TowerOutput, parse_model_args

log = logging.getLogger(__name__)

EPS = 1e-8
VARIANTS = ("t2i", "i2t", "ens")
_NORMALIZATIONS = ("batchnorm", "none")
_ACTIVATIONS = ("leaky_relu", "none")
_FUSED = ("auto", "native", "compile", "eager")
#: ``fused="auto"`` compiles once a call's work (pairs x tokens x channels) reaches this:
#: compiling costs seconds once per process, eager ops are fine for small batches.
AUTO_COMPILE_MIN_WORK = 1 << 28
#: the same bound for a training step: training repeats the step hundreds of times, so
#: compiling (once per process) pays off from batches far smaller than one scoring call
AUTO_COMPILE_MIN_TRAIN_WORK = 1 << 24
#: pairs per group of re-ranking rows for the C kernels (only the group's tokens are gathered)
NATIVE_ROW_PAIRS = 1 << 16
#: Working set of one eager chunk: eager ops stream token-sized intermediates through memory
#: several times, so chunks stay near the last-level cache.
EAGER_CHUNK_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------
# layers (the paper's building blocks, used as written by the reference tests)
# ------------------------------------------------------------------------------------------
class AdaptLayer(nn.Module):
    """The ADAPT layer: a query vector predicts a per-channel scale and shift.

    ``gamma = fc_gamma(query)``, ``beta = fc_beta(query)`` (one linear layer each, the
    original's default ``nonlinear_proj=False``); values are adapted as
    ``value * (gamma + 1) + beta``.
    """

    def __init__(self, value_dim: int, query_dim: int | None = None) -> None:
        super().__init__()
        query_dim = query_dim or value_dim
        self.fc_gamma = nn.Linear(query_dim, value_dim)
        self.fc_beta = nn.Linear(query_dim, value_dim)

    def scale_shift(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma + 1, beta)``, each ``(B, value_dim)``, for queries ``(B, query_dim)``."""
        return self.fc_gamma(query) + 1.0, self.fc_beta(query)

    def forward(self, value: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Adapt ``value`` ``(B, N, D)`` with ``query`` ``(B, Dq)`` row by row (or ``(1, Dq)``
        broadcast over all rows, the original's one-to-many retrieval case)."""
        scale, shift = self.scale_shift(query)
        return value * scale[:, None, :] + shift[:, None, :]


class Fovea(nn.Module):
    """``softmax(smooth * x) * x`` over the token axis, per channel (the original's Fovea).

    ``x`` is ``(B, N, D)``; padded tokens (``mask`` False) get zero weight. ``smooth`` is a
    constant, or a trained scalar with ``train_smooth=True``.
    """

    def __init__(self, smooth: float = 10.0, train_smooth: bool = False) -> None:
        super().__init__()
        self.train_smooth = train_smooth
        if train_smooth:
            self.smooth = nn.Parameter(torch.tensor(float(smooth)))
        else:
            self.register_buffer("smooth", torch.tensor(float(smooth)), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = x * self.smooth
        if mask is not None:
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
        return torch.softmax(logits, dim=1) * x  # (B, N, D)


class MaskedBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over token features ``(B, N, D)``; statistics over real tokens only.

    Same buffers (and state-dict keys) as ``nn.BatchNorm1d``; padded positions come out as 0.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        B, N, D = x.shape
        if mask is None or bool(mask.all()):
            return super().forward(x.reshape(B * N, D)).view(B, N, D)
        out = x.new_zeros(B, N, D)
        out[mask] = super().forward(x[mask])  # (real tokens, D)
        return out


# ------------------------------------------------------------------------------------------
# fused kernels: pure torch functions, compiled with inductor when allowed
# ------------------------------------------------------------------------------------------
# Each kernel takes ``fused``: compiled, ``exp`` is written once per use so inductor keeps
# everything in one loop over the regions (a shared ``exp`` buffer would be materialised);
# eager, it is computed once and reused.
def _exp_pair(y: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.exp(y)
    return e, (torch.exp(y) if fused else e)


def _t2i_scores(x, bias, k, xext, scale, shift, chat, fused: bool = True):
    """ADAPT-T2I scores ``(Ni, Nt)`` of every image against every caption.

    ``x`` (Ni, R, D) normalised regions, ``bias`` (Ni, R) 0 / -inf for padding, ``k`` (Nt, D)
    ``= smooth * scale``, ``xext`` (Ni, Nt, D) softmax shift, ``scale``/``shift`` (Nt, D),
    ``chat`` (Nt, D) unit caption vectors.
    """
    d = x[:, None] - xext[:, :, None]  # (Ni, Nt, R, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    e1, e2 = _exp_pair(y, fused)
    z = e1.sum(2)  # (Ni, Nt, D)
    s1 = (e2 * d).sum(2)
    v = scale * (xext + s1 / z) + shift  # (Ni, Nt, D) pooled adapted image vectors
    return (v * chat).sum(-1) / v.norm(dim=-1).clamp_min(EPS)


def _rows_prep(cond, idx, xmax, xmin, smooth, fused: bool = True):
    """Per-pair inputs of the row kernels from per-item conditioning ``cond`` (U, 3D).

    Returns ``k``, ``xext``, ``scale``, ``shift``, ``unit`` (G, T, D) for pairs ``idx`` (G, T).
    A separate kernel: fused with the row kernel, inductor would materialise the (G, T, L, D)
    intermediate instead of keeping it in registers.
    """
    dim = xmax.shape[-1]
    c = cond[idx]  # (G, T, 3D)
    scale, shift, unit = c[..., :dim], c[..., dim:2 * dim], c[..., 2 * dim:]
    k = scale * smooth
    xext = torch.where(k > 0, xmax[:, None], xmin[:, None])
    return k, xext, scale, shift, unit


def _t2i_rows(x, bias, k, xext, scale, shift, chat, fused: bool = True):
    """ADAPT-T2I scores ``(G, T)``: image ``g`` against its own list of ``T`` captions.

    ``x`` (G, R, D), ``bias`` (G, R); per pair ``k``/``xext``/``scale``/``shift``/``chat``
    (G, T, D). Used to re-score shortlists: an image's regions stay in cache while its
    captions pass.
    """
    d = x[:, None] - xext[:, :, None]  # (G, T, R, D)
    y = d * k[:, :, None] + bias[:, None, :, None]
    e1, e2 = _exp_pair(y, fused)
    z = e1.sum(2)  # (G, T, D)
    s1 = (e2 * d).sum(2)
    v = scale * (xext + s1 / z) + shift
    return (v * chat).sum(-1) / v.norm(dim=-1).clamp_min(EPS)


def _i2t_scores(x, bias, k, xext, scale, shift, qhat, fused: bool = True):
    """ADAPT-I2T scores ``(Nt, Ni)`` (transposed by the caller).

    ``x`` (Nt, L, D) normalised words, ``bias`` (Nt, L), ``k``/``scale``/``shift``/``qhat``
    (Ni, D) from the image vectors, ``xext`` (Nt, Ni, D).
    """
    d = x[:, None] - xext[:, :, None]  # (Nt, Ni, L, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    e1, e2 = _exp_pair(y, fused)
    z = e1.sum(2)  # (Nt, Ni, D)
    a = x[:, None] * scale[None, :, None] + shift[None, :, None]  # adapted words
    mx = (e2 * a + bias[:, None, :, None]).amax(2)  # padded words -> -inf
    v = mx / z  # (Nt, Ni, D) max over words of softmax(smooth a) * a
    return (v * qhat).sum(-1) / v.norm(dim=-1).clamp_min(EPS)


def _i2t_rows(x, bias, k, xext, scale, shift, qhat, fused: bool = True):
    """ADAPT-I2T scores ``(G, I)``: caption ``g`` against its own list of ``I`` images.

    ``x`` (G, L, D) words, ``bias`` (G, L); per pair ``k``/``xext``/``scale``/``shift``/``qhat``
    (G, I, D).
    """
    d = x[:, None] - xext[:, :, None]  # (G, I, L, D)
    y = d * k[:, :, None] + bias[:, None, :, None]
    e1, e2 = _exp_pair(y, fused)
    z = e1.sum(2)  # (G, I, D)
    a = x[:, None] * scale[:, :, None] + shift[:, :, None]
    v = (e2 * a + bias[:, None, :, None]).amax(2) / z
    return (v * qhat).sum(-1) / v.norm(dim=-1).clamp_min(EPS)


# training kernels: one pass over the tokens each (moments forward, token gradient backward),
# and the per-pair epilogue over (pairs, D) apart, so inductor keeps each loop nest simple
def _t2i_moments(x, bias, k, xext, fused: bool = True):
    """``(Z, S1, S2)`` each (Ni, Nt, D): sums over regions of ``e``, ``e d`` and ``e d^2``."""
    d = x[:, None] - xext[:, :, None]  # (Ni, Nt, R, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    e = torch.exp(y)
    if fused:
        return e.sum(2), (torch.exp(y) * d).sum(2), (torch.exp(y) * d * d).sum(2)
    z = e.sum(2)
    ed = e.mul_(d)
    s1 = ed.sum(2)
    return z, s1, ed.mul_(d).sum(2)


def _t2i_pool(xext, z, s1, s2, scale, shift, chat, fused: bool = True):
    """Scores, ``|v|``, ``m = E_p[x]`` and ``Var_p[x]`` of a tile from its moments."""
    mc = s1 / z  # (Ni, Nt, D) mean relative to the shift
    var = (s2 / z - mc * mc).clamp_min(0.0)
    m = xext + mc
    v = scale * m + shift  # (Ni, Nt, D) pooled adapted image vectors
    n = v.norm(dim=-1).clamp_min(EPS)
    return (v * chat).sum(-1) / n, n, m, var


def _t2i_pool_bwd(scale, shift, chat, smooth, z, m, var, n, s, g, fused: bool = True):
    """From ``g = dL/dscore`` (Ni, Nt): the regions' weight ``a = dL/dm * scale / Z`` (Ni, Nt, D)
    and the gradients of ``chat``, ``shift``, ``scale``, ``k`` summed over the tile's images.

    ``v = scale * m + shift``, ``dscore/dv = (chat - s v / |v|) / |v|``, ``dm/dk = Var_p[x]``.
    """
    v = scale * m + shift
    gn = (g / n)[..., None]  # (Ni, Nt, 1)
    gv = gn * (chat - (s / n)[..., None] * v)  # (Ni, Nt, D) gradient of v
    g_k = (gv * scale * var).sum(0)
    return gv * scale / z, (gn * v).sum(0), gv.sum(0), (gv * m).sum(0) + smooth * g_k, g_k


def _t2i_grad_x(x, bias, k, xext, a, m, fused: bool = True):
    """``sum_t a e (1 + k (x - m))`` (Ni, R, D): the regions' gradient, ``dm/dx_r = p_r (1 + k (x_r - m))``."""
    d = x[:, None] - xext[:, :, None]  # (Ni, Nt, R, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    w = a[:, :, None] * (1.0 + k[None, :, None] * (x[:, None] - m[:, :, None]))
    return (torch.exp(y) * w).sum(1)


def _i2t_moments(w, bias, k, xext, scale, shift, fused: bool = True):
    """``Z``, ``S1 = sum e d`` and the max of ``e a`` over words with its arg-max (Nt, Ni, D)."""
    d = w[:, None] - xext[:, :, None]  # (Nt, Ni, L, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    e1, e2 = _exp_pair(y, fused)
    e3 = torch.exp(y) if fused else e1
    a = w[:, None] * scale[None, :, None] + shift[None, :, None]  # adapted words
    mx, arg = (e3 * a + bias[:, None, :, None]).max(2)  # padded words -> -inf
    return e1.sum(2), (e2 * d).sum(2), mx, arg


def _i2t_pool(xext, z, s1, mx, qhat, fused: bool = True):
    """Scores, ``|v|`` (Nt, Ni) and ``E_p[w]`` (Nt, Ni, D) of a tile."""
    v = mx / z  # (Nt, Ni, D) max over words of softmax(smooth a) * a
    n = v.norm(dim=-1).clamp_min(EPS)
    return (v * qhat).sum(-1) / n, n, xext + s1 / z


def _i2t_pool_bwd(ws, xext, scale, shift, qhat, smooth, z, ex, n, s, g, fused: bool = True):
    """From ``g`` (Nt, Ni) and the arg-max words ``ws`` (Nt, Ni, D): the words' terms ``c``,
    ``hit`` and the gradients of ``qhat``, ``shift``, ``scale``, ``k`` summed over captions.

    ``v = p* a*``: ``dv/dshift = p*``, ``dv/dk = p* a* (w* - E_p[w])``,
    ``dv/dscale = p* w* + smooth dv/dk``, ``dv/dw_l = p* ([l = w*] (k a* + scale) - k a* p_l)``.
    """
    k = smooth * scale  # (Ni, D)
    ps = torch.exp(k * (ws - xext)) / z
    astar = ws * scale + shift
    v = ps * astar
    gn = (g / n)[..., None]  # (Nt, Ni, 1)
    gp = gn * (qhat - (s / n)[..., None] * v) * ps  # gradient of v, times p*
    g_k = (gp * astar * (ws - ex)).sum(0)
    return (gp * k * astar / z, gp * (k * astar + scale), (gn * v).sum(0), gp.sum(0),
            (gp * ws).sum(0) + smooth * g_k, g_k)


def _i2t_grad_w(w, bias, k, xext, c, hit, arg, fused: bool = True):
    """``sum_i [l = w*] hit - c e_l`` (Nt, L, D): the words' gradient."""
    d = w[:, None] - xext[:, :, None]  # (Nt, Ni, L, D)
    y = d * k[None, :, None] + bias[:, None, :, None]
    word = torch.arange(w.shape[1], device=w.device)[None, None, :, None]  # (1, 1, L, 1)
    return (torch.where(word == arg[:, :, None], hit[:, :, None], 0.0) - c[:, :, None] * torch.exp(y)).sum(1)


class _Kernel:
    """A kernel run compiled (inductor; once per process, dynamic shapes) or eagerly."""

    failed = False  # set when compilation does not work here; then everything runs eagerly

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None

    @property
    def ready(self) -> bool:
        """Compiled already (then small calls use it too, for consistent numerics)."""
        return self._compiled is not None and not _Kernel.failed

    def __call__(self, *args: Any, compiled: bool) -> Any:
        if compiled and not _Kernel.failed:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True)
            try:
                return self._compiled(*args)
            except Exception as exc:  # noqa: BLE001 - no compiler, unsupported backend, ...
                _Kernel.failed = True
                log.warning("torch.compile is unavailable for ADAPT scoring (%s: %s); using eager ops",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return self.fn(*args, fused=False)


_K_T2I = _Kernel(_t2i_scores)
_K_ROWS_PREP = _Kernel(_rows_prep)
_K_T2I_ROWS = _Kernel(_t2i_rows)
_K_T2I_MOMENTS = _Kernel(_t2i_moments)
_K_T2I_POOL = _Kernel(_t2i_pool)
_K_T2I_POOL_BWD = _Kernel(_t2i_pool_bwd)
_K_T2I_GRAD_X = _Kernel(_t2i_grad_x)
_K_I2T = _Kernel(_i2t_scores)
_K_I2T_ROWS = _Kernel(_i2t_rows)
_K_I2T_MOMENTS = _Kernel(_i2t_moments)
_K_I2T_POOL = _Kernel(_i2t_pool)
_K_I2T_POOL_BWD = _Kernel(_i2t_pool_bwd)
_K_I2T_GRAD_W = _Kernel(_i2t_grad_w)


def _t2i_train_fwd(x, bias, xmax, xmin, scale, shift, chat, smooth, compiled: bool):
    """ADAPT-T2I training forward of one tile: scores and ``|v|`` (Ni, Nt) and the statistics
    the backward needs, ``Z``, ``m = E_p[x]``, ``Var_p[x]`` (Ni, Nt, D)."""
    k = smooth * scale  # (Nt, D)
    xext = _shift(k, xmax, xmin)  # (Ni, Nt, D)
    z, s1, s2 = _K_T2I_MOMENTS(x, bias, k, xext, compiled=compiled)
    s, n, m, var = _K_T2I_POOL(xext, z, s1, s2, scale, shift, chat, compiled=compiled)
    return s, n, z, m, var


def _t2i_train_bwd(x, bias, xmax, xmin, scale, shift, chat, smooth, z, m, var, n, s, g, compiled: bool):
    """ADAPT-T2I backward of one tile: gradients of ``x`` (Ni, R, D) and of ``chat``, ``shift``,
    ``scale``, ``k`` (Nt, D, summed over the tile's images)."""
    k = smooth * scale
    a, *rest = _K_T2I_POOL_BWD(scale, shift, chat, smooth, z, m, var, n, s, g, compiled=compiled)
    return (_K_T2I_GRAD_X(x, bias, k, _shift(k, xmax, xmin), a, m, compiled=compiled), *rest)


def _i2t_train_fwd(w, bias, wmax, wmin, scale, shift, qhat, smooth, compiled: bool):
    """ADAPT-I2T training forward of one tile, captions first: scores and ``|v|`` (Nt, Ni),
    ``Z``, ``E_p[w]`` and the arg-max word per channel (Nt, Ni, D)."""
    k = smooth * scale  # (Ni, D)
    xext = _shift(k, wmax, wmin)  # (Nt, Ni, D)
    z, s1, mx, arg = _K_I2T_MOMENTS(w, bias, k, xext, scale, shift, compiled=compiled)
    s, n, ex = _K_I2T_POOL(xext, z, s1, mx, qhat, compiled=compiled)
    return s, n, z, ex, arg


def _i2t_train_bwd(w, bias, wmax, wmin, scale, shift, qhat, smooth, z, ex, arg, n, s, g, compiled: bool):
    """ADAPT-I2T backward of one tile: gradients of ``w`` (Nt, L, D) and of ``qhat``, ``shift``,
    ``scale``, ``k`` (Ni, D, summed over the tile's captions)."""
    k = smooth * scale
    ws = torch.gather(w, 1, arg)  # (Nt, Ni, D) the arg-max words
    xext = _shift(k, wmax, wmin)  # (Nt, Ni, D)
    c, hit, *rest = _K_I2T_POOL_BWD(ws, xext, scale, shift, qhat, smooth, z, ex, n, s, g, compiled=compiled)
    return (_K_I2T_GRAD_W(w, bias, k, xext, c, hit, arg, compiled=compiled), *rest)


def compile_available() -> bool:
    """Whether fused kernels may be compiled (``XMODAL_COMPILE=0`` turns compilation off)."""
    return os.environ.get("XMODAL_COMPILE", "1") not in ("0", "false", "no") and not _Kernel.failed


def _slices(n: int, size: int) -> Iterator[slice]:
    size = max(1, int(size))
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _grid(ni: int, nt: int, max_pairs: int) -> Iterator[tuple[slice, slice]]:
    """Tiles covering ``ni x nt`` with at most ``max_pairs`` pairs each, whole image rows first."""
    bi = max(1, min(ni, max_pairs))
    bt = max(1, min(nt, max_pairs // bi))
    for si in _slices(ni, bi):
        for st in _slices(nt, bt):
            yield si, st


def _row_groups(owner: torch.Tensor, max_pairs: int,
                max_padding: float = 0.2) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Group pairs by ``owner`` (the item whose tokens are reused) into padded rows.

    Yields ``(owners (G,), pair_idx (G, T), valid (G, T))``: row ``g`` lists the pairs of
    ``owners[g]`` (padded by repeating its first pair). Owners are taken in order of their
    pair count and a group grows while ``G * T <= max_pairs`` (one owner may exceed it) and
    at most ``max_padding`` of its slots are padding.
    """
    order = torch.argsort(owner, stable=True)
    uniq, counts = torch.unique_consecutive(owner[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    by_count = torch.argsort(counts, stable=True)
    counts_sorted = counts[by_count].tolist()
    g0 = 0
    while g0 < len(by_count):
        g1, real = g0 + 1, counts_sorted[g0]
        while g1 < len(by_count):
            rows, width = g1 + 1 - g0, counts_sorted[g1]
            if rows * width > max_pairs or rows * width > (1.0 + max_padding) * (real + width):
                break
            real += width
            g1 += 1
        rows = by_count[g0:g1]
        width = counts_sorted[g1 - 1]
        col = torch.arange(width, device=owner.device)[None]  # (1, T)
        valid = col < counts[rows][:, None]  # (G, T)
        pos = starts[rows][:, None] + torch.minimum(col, counts[rows][:, None] - 1)
        yield uniq[rows], order[pos], valid
        g0 = g1


def _extremes(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item largest and smallest value of every channel over real tokens: (N, D) each."""
    if mask is None:
        return x.amax(1), x.amin(1)
    m = ~mask[..., None]
    return x.masked_fill(m, float("-inf")).amax(1), x.masked_fill(m, float("inf")).amin(1)


def _shift(k: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor) -> torch.Tensor:
    """``(N_items, N_queries, D)``: the token extreme that makes ``k (x - shift) <= 0``."""
    return torch.where(k[None] > 0, xmax[:, None], xmin[:, None])


def _bias(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Additive softmax mask ``(N, L)``: 0 for real tokens, -inf for padding."""
    if mask is None:
        return x.new_zeros(x.shape[:2])
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))


def _owner_chunks(mask: torch.Tensor | None, n: int, length: int,
                  size: int) -> tuple[torch.Tensor | None, list[tuple[slice, int]]]:
    """``(order, chunks)``: items sorted by their number of real tokens (``order`` is None
    without padding) and contiguous chunks of at most ``size`` sorted items, each with the
    token count it needs, so a chunk is trimmed to its longest item and the work follows the
    real token counts, not the batch's padded width."""
    if mask is None:
        return None, [(sl, length) for sl in _slices(n, size)]
    lengths = mask.sum(1)  # (N,)
    order = torch.argsort(lengths, stable=True)
    ordered = lengths[order]
    return order, [(sl, int(ordered[sl].max())) for sl in _slices(n, size)]


class _AdaptScore(torch.autograd.Function):
    """ADAPT scores ``(N_tok, N_cond)`` for training, with the analytic gradient, fused.

    ``tok`` (N_tok, L, D) are the adapted side's tokens (T2I: regions, I2T: words); ``scale``,
    ``shift``, ``unit`` (N_cond, D) the conditioning side's ``gamma + 1``, ``beta`` and unit
    vector; ``smooth`` the Fovea smoothing (0-d). ``kernels`` is the direction's
    ``(forward, backward)`` pair. Work runs over chunks of tokens sorted by length and trimmed
    to the chunk's longest item; the forward keeps three ``(N_tok, N_cond, D)`` statistics
    and the backward recomputes ``exp`` once, so no ``(N_tok, N_cond, L, D)`` tensor is kept
    (compiled: none is ever written).
    """

    @staticmethod
    def forward(ctx, tok, scale, shift, unit, smooth, mask, kernels, compiled, max_pairs):  # type: ignore[override]
        nk, length, dim = tok.shape
        nc = scale.shape[0]
        # unpadded tokens run in as few tiles as memory allows (compiled: one, no copies),
        # padded ones in chunks of 16 sorted by length
        order, chunks = _owner_chunks(mask, nk, length, max(1, min(nk if mask is None else 16, max_pairs // max(1, nc))))
        if order is not None:
            tok, mask = tok[order], mask[order]  # (N_tok, L, D) sorted by real token count
        bias = _bias(mask, tok)
        tmax, tmin = _extremes(tok, mask)
        if len(chunks) == 1 and max_pairs >= nk * nc:  # one call: its outputs are the buffers
            out, n, *stats = kernels[0](tok, bias, tmax, tmin, scale, shift, unit, smooth, compiled=compiled)
            chunks = [(slice(0, nk), length)]
        else:
            out, n = tok.new_empty(nk, nc), tok.new_empty(nk, nc)
            stats: list[torch.Tensor] = []
            for sl, lc in chunks:
                for st in _slices(nc, max(1, max_pairs // (sl.stop - sl.start))):
                    res = kernels[0](tok[sl, :lc], bias[sl, :lc], tmax[sl], tmin[sl], scale[st], shift[st],
                                     unit[st], smooth, compiled=compiled)
                    if not stats:
                        stats = [torch.empty((nk, nc, dim), dtype=r.dtype, device=tok.device) for r in res[2:]]
                    for buf, r in zip([out, n, *stats], res):
                        buf[sl, st] = r
        ctx.save_for_backward(tok, scale, shift, unit, smooth, bias, tmax, tmin, n, out, *stats)
        ctx.kernels, ctx.compiled, ctx.max_pairs, ctx.chunks, ctx.order = kernels, compiled, max_pairs, chunks, order
        return out if order is None else torch.empty_like(out).index_copy_(0, order, out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        tok, scale, shift, unit, smooth, bias, tmax, tmin, n, out, *stats = ctx.saved_tensors
        order = ctx.order
        grad = grad if order is None else grad[order]  # in the sorted order of the tokens
        g_tok = torch.zeros_like(tok)
        acc = [torch.zeros_like(scale) for _ in range(4)]  # unit, shift, scale, k
        for sl, lc in ctx.chunks:
            for st in _slices(scale.shape[0], max(1, ctx.max_pairs // (sl.stop - sl.start))):
                per_pair = [x[sl, st] for x in (*stats, n, out, grad)]
                res = ctx.kernels[1](tok[sl, :lc], bias[sl, :lc], tmax[sl], tmin[sl], scale[st], shift[st],
                                     unit[st], smooth, *per_pair, compiled=ctx.compiled)
                g_tok[sl, :lc] += res[0]
                for a, r in zip(acc, res[1:]):
                    a[st] += r
        if order is not None:
            g_tok = torch.empty_like(g_tok).index_copy_(0, order, g_tok)
        g_unit, g_shift, g_scale, g_k = acc
        g_smooth = (g_k * scale).sum().reshape(smooth.shape) if ctx.needs_input_grad[4] else None
        return g_tok, g_scale, g_shift, g_unit, g_smooth, None, None, None, None


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
def _token_projection(in_dim: int | None, dim: int) -> nn.Linear | None:
    if in_dim is None:
        return None
    fc = nn.Linear(in_dim, dim)
    # the original's Xavier-uniform init of its region fc (EncoderImagePrecomp.init_weights)
    bound = (6.0 / (in_dim + dim)) ** 0.5
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.zeros_(fc.bias)
    return fc


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return tokens.mean(1)
    m = mask[..., None].to(tokens.dtype)  # (B, N, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def _as_bool_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() == 1:  # lengths
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < mask.to(tokens.device)[:, None]
    mask = mask.to(device=tokens.device, dtype=torch.bool)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if not bool(mask.any(1).all()):
        raise XmodalError("ADAPT: an item has no real token (empty caption or image without regions)")
    return None if bool(mask.all()) else mask


class Adapt(FrozenTowers, PairScorer):
    """ADAPT-T2I (``direction="t2i"``) or ADAPT-I2T (``direction="i2t"``) over two towers.

    Representations (:meth:`encode_image_reps` / :meth:`encode_text_reps`) are
    :class:`TowerOutput` objects computed once per item: the side being adapted keeps its
    normalised tokens, the conditioning side only its global vector (``pooled``).
    :meth:`score` scores every image against every caption of two sets.
    """


    def __init__(self, image_tower: nn.Module | None, text_tower: nn.Module | None, dim: int, *,
                 direction: str = "t2i", smooth: float = 10.0, train_smooth: bool = False,
                 normalization: str = "batchnorm", region_act: str = "leaky_relu",
                 region_l2norm: bool = True, word_l2norm: bool = True,
                 frozen_image: bool = False, frozen_text: bool = False,
                 image_in_dim: int | None = None, text_in_dim: int | None = None,
                 fused: str = "auto", chunk_mb: float = 256.0) -> None:
        super().__init__()
        if direction not in ("t2i", "i2t"):
            raise ConfigError(f"model.args.variant: expected t2i or i2t for one ADAPT model, got {direction!r}")
        if normalization not in _NORMALIZATIONS:
            raise ConfigError(f"model.args.normalization: expected one of {', '.join(_NORMALIZATIONS)}, "
                              f"got {normalization!r}")
        if region_act not in _ACTIVATIONS:
            raise ConfigError(f"model.args.region_act: expected one of {', '.join(_ACTIVATIONS)}, got {region_act!r}")
        if fused not in _FUSED:
            raise ConfigError(f"model.args.fused: expected one of {', '.join(_FUSED)}, got {fused!r}")
        if not chunk_mb > 0:
            raise ConfigError(f"model.args.chunk_mb: expected a positive number, got {chunk_mb!r}")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.frozen_image = frozen_image
        self.frozen_text = frozen_text
        self.dim = dim
        self.direction = direction
        self.region_act = region_act
        self.region_l2norm = region_l2norm
        self.word_l2norm = word_l2norm
        self.fused = fused
        self.chunk_bytes = int(chunk_mb * (1 << 20))
        # token projections into the latent space, for towers that do not end in one (frozen
        # backbones such as EfficientNet grids or MiniLM words): Xavier init like the original's fc
        self.image_proj = _token_projection(image_in_dim, dim)
        self.text_proj = _token_projection(text_in_dim, dim)
        self.adapt = AdaptLayer(dim, dim)
        self.norm = MaskedBatchNorm(dim, affine=False) if normalization == "batchnorm" else None
        self.fovea = Fovea(smooth, train_smooth)

    # housekeeping -------------------------------------------------------------------
    def input_needs(self) -> tuple[str, str]:
        return ("tokens", "tokens")

    def _device(self) -> torch.device:
        return self.adapt.fc_gamma.weight.device

    def _compiled(self, work: int, kernel: "_Kernel", min_work: int = AUTO_COMPILE_MIN_WORK) -> bool:
        if self.fused == "eager" or not compile_available():
            return False
        return self.fused == "compile" or kernel.ready or work >= min_work

    # towers -------------------------------------------------------------------------
    def _image_features(self, images: Any) -> TowerOutput:
        if isinstance(images, TowerOutput):
            return images
        if self.image_tower is None:
            raise XmodalError("ADAPT model has no image tower: pass cached TowerOutput features")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_image):
            return self.image_tower(images)

    def _text_features(self, texts: Any) -> TowerOutput:
        if isinstance(texts, TowerOutput):
            return texts
        if self.text_tower is None:
            raise XmodalError("ADAPT model has no text tower: pass cached TowerOutput features")
        batch = texts if isinstance(texts, dict) else self.text_tower.tokenize(list(texts))
        device = self._device()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_text):
            return self.text_tower(batch)

    # representations ----------------------------------------------------------------
    def _condition(self, vec: torch.Tensor) -> torch.Tensor:
        """``[gamma + 1, beta, vec / |vec|]`` (B, 3D): what a conditioning vector contributes."""
        scale, shift = self.adapt.scale_shift(vec)
        return torch.cat([scale, shift, _l2norm(vec)], dim=-1)

    def _split(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.dim
        return cond[..., :d], cond[..., d:2 * d], cond[..., 2 * d:]

    def encode_image_reps(self, images: Any) -> TowerOutput:
        """T2I: normalised regions ``(B, R, D)`` + mask; I2T: the image's conditioning
        ``(B, 1, 3D)`` (see :meth:`_condition`). ``pooled`` is the image vector ``(B, D)``."""
        feats = self._image_features(images)
        x = feats.tokens
        if x.dim() == 2:
            x = x[:, None]  # (B, 1, D) pooled features as one region
        if self.image_proj is not None:
            x = self.image_proj(x.to(self.image_proj.weight.dtype))  # (B, R, D_in) -> (B, R, D)
        mask = _as_bool_mask(feats.mask, x)
        if self.region_act == "leaky_relu":
            x = F.leaky_relu(x, 0.1)
        if self.region_l2norm:
            x = _l2norm(x)
        pooled = _masked_mean(x, mask)  # (B, D) the image vector conditioning I2T
        if self.direction == "i2t":
            return TowerOutput(tokens=self._condition(pooled)[:, None], pooled=pooled, mask=None)
        if self.norm is not None:
            x = self.norm(x, mask)
        return TowerOutput(tokens=x, pooled=pooled, mask=mask)

    def encode_text_reps(self, texts: Any) -> TowerOutput:
        """I2T: normalised words ``(B, L, D)`` + mask; T2I: the caption's conditioning
        ``(B, 1, 3D)``, computed once per caption. ``pooled`` is the caption vector ``(B, D)``."""
        feats = self._text_features(texts)
        w = feats.tokens
        if self.text_proj is not None:
            w = self.text_proj(w.to(self.text_proj.weight.dtype))  # (B, L, D_in) -> (B, L, D)
        mask = _as_bool_mask(feats.mask, w)
        if self.word_l2norm:
            w = _l2norm(w)
        pooled = _masked_mean(w, mask)  # (B, D) the caption vector conditioning T2I
        if self.direction == "t2i":
            return TowerOutput(tokens=self._condition(pooled)[:, None], pooled=pooled, mask=None)
        if self.norm is not None:
            w = self.norm(w, mask)
        return TowerOutput(tokens=w, pooled=pooled, mask=mask)

    def first_stage_embeddings(self, image_reps: TowerOutput,
                               text_reps: TowerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and caption vectors (mean of regions / words): a cheap first stage."""
        return _l2norm(image_reps.pooled), _l2norm(text_reps.pooled)

    # scoring ------------------------------------------------------------------------
    def _max_pairs(self, per_pair_bytes: int, compiled: bool = True) -> int:
        """Pairs per chunk: the compiled kernels keep token tensors in registers, so only the
        memory bound matters; eager ops write token-sized intermediates, kept cache-sized."""
        budget = self.chunk_bytes if compiled else min(self.chunk_bytes, EAGER_CHUNK_BYTES)
        return max(1, budget // max(1, per_pair_bytes))

    def _needs_grad(self, *tensors: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                            or any(p.requires_grad for p in self.parameters()))

    def score(self, image_reps: TowerOutput, text_reps: TowerOutput) -> torch.Tensor:
        """Scores ``(Ni, Nt)`` of every image against every caption (cosine, in [-1, 1])."""
        if self.direction == "t2i":
            return self._score_t2i(image_reps, text_reps)
        return self._score_i2t(image_reps, text_reps)

    def _score_t2i(self, img: TowerOutput, txt: TowerOutput) -> torch.Tensor:
        x, mask, cond = img.tokens, img.mask, txt.tokens[:, 0]
        ni, r, d = x.shape
        nt = cond.shape[0]
        scale, shift, chat = self._split(cond)  # (Nt, D) each
        if self._needs_grad(x, cond):
            return self._score_train(x, mask, scale, shift, chat, (_t2i_train_fwd, _t2i_train_bwd, _K_T2I_MOMENTS))
        lengths = self._native_lengths(x, mask, cond)
        if lengths is not None:
            return self._score_native(x, mask, lengths, scale, shift, chat)
        k = self.fovea.smooth * scale
        bias = _bias(mask, x)
        xmax, xmin = _extremes(x, mask)
        compiled = self._compiled(ni * nt * r * d, _K_T2I)
        out = x.new_empty(ni, nt)
        per_pair = 4 * d * (4 if compiled else 3 * r)
        for si, st in _grid(ni, nt, self._max_pairs(per_pair, compiled)):
            xext = _shift(k[st], xmax[si], xmin[si])
            out[si, st] = _K_T2I(x[si], bias[si], k[st], xext, scale[st], shift[st], chat[st], compiled=compiled)
        return out

    def _score_i2t(self, img: TowerOutput, txt: TowerOutput) -> torch.Tensor:
        cond, w, mask = img.tokens[:, 0], txt.tokens, txt.mask
        nt, length, d = w.shape
        ni = cond.shape[0]
        scale, shift, qhat = self._split(cond)  # (Ni, D) each
        if self._needs_grad(w, cond):
            return self._score_train(w, mask, scale, shift, qhat, (_i2t_train_fwd, _i2t_train_bwd, _K_I2T_MOMENTS)).t()
        lengths = self._native_lengths(w, mask, cond)
        if lengths is not None:
            return self._score_native(w, mask, lengths, scale, shift, qhat).t()
        k = self.fovea.smooth * scale
        bias = _bias(mask, w)
        wmax, wmin = _extremes(w, mask)
        compiled = self._compiled(ni * nt * length * d, _K_I2T)
        out = w.new_empty(ni, nt)
        per_pair = 4 * d * (4 if compiled else 4 * length)
        for st, si in _grid(nt, ni, self._max_pairs(per_pair, compiled)):
            xext = _shift(k[si], wmax[st], wmin[st])  # (Nt, Ni, D)
            out[si, st] = _K_I2T(w[st], bias[st], k[si], xext, scale[si], shift[si], qhat[si],
                                 compiled=compiled).t()
        return out

    def _native_lengths(self, tok: torch.Tensor, mask: torch.Tensor | None, *cond: torch.Tensor) -> torch.Tensor | None:
        """Real token counts for the C kernels, or None where they do not apply (``fused``
        compile/eager, not float32 on CPU, a mask that is not a prefix, kernels unavailable)."""
        if self.fused not in ("auto", "native") or not adapt_native.supports(tok, *cond):
            return None
        if self.fused == "native":
            adapt_native.require()
        elif not adapt_native.available():
            return None
        return adapt_native.lengths_of(mask, tok)

    def _score_native(self, tok, mask, lengths, scale, shift, unit) -> torch.Tensor:
        """Scores ``(N_tok, N_cond)`` through the C kernels (no statistics kept: no gradient)."""
        tmax, tmin = _extremes(tok, mask)
        ins = [t.contiguous() for t in (tok, tmax, tmin, scale, shift, unit)]
        out, _, *_ = adapt_native.fovea_forward(self.direction, ins[0], lengths, *ins[1:],
                                                float(self.fovea.smooth), stats=False)
        return out

    def _score_train(self, tok, mask, scale, shift, unit, kernels) -> torch.Tensor:
        """Training scores ``(N_tok, N_cond)`` with the analytic gradient: the C kernels
        (:class:`~.adapt_native.NativeAdaptScore`) where they apply, else :class:`_AdaptScore`."""
        smooth = self.fovea.smooth.to(tok.dtype)
        lengths = self._native_lengths(tok, mask, scale, shift, unit)
        if lengths is not None:
            with torch.no_grad():
                tmax, tmin = _extremes(tok, mask)  # (N_tok, D): the softmax shift, a constant
            return adapt_native.NativeAdaptScore.apply(tok, scale, shift, unit, smooth, lengths, tmax, tmin,
                                                       self.direction)
        n_tok, length, d = tok.shape
        compiled = self._compiled(n_tok * scale.shape[0] * length * d, kernels[2], AUTO_COMPILE_MIN_TRAIN_WORK)
        # compiled, only (pairs, D) statistics are written; eager ops write (pairs, L, D) ones
        per_pair = 4 * d * (6 if compiled else 4 * length)
        return _AdaptScore.apply(tok, scale, shift, unit, smooth, mask, kernels, compiled,
                                 self._max_pairs(per_pair, compiled))

    @torch.no_grad()
    def score_pairs(self, image_reps: TowerOutput, text_reps: TowerOutput, image_idx: torch.Tensor,
                    text_idx: torch.Tensor) -> torch.Tensor:
        """Scores ``(P,)`` of the listed pairs ``(image_idx[p], text_idx[p])`` (re-ranking).

        Pairs are grouped by the item whose tokens are adapted (images for T2I, captions for
        I2T), so each item's tokens are read once per group, as in :meth:`score`.
        """
        ii = torch.as_tensor(image_idx, dtype=torch.long, device=self._device())
        tt = torch.as_tensor(text_idx, dtype=torch.long, device=self._device())
        t2i = self.direction == "t2i"
        owner, other = (ii, tt) if t2i else (tt, ii)
        tok_reps, vec_reps = (image_reps, text_reps) if t2i else (text_reps, image_reps)
        x_all, mask_all = tok_reps.tokens, tok_reps.mask
        length, d = x_all.shape[1], x_all.shape[2]
        cond = vec_reps.tokens[:, 0]  # (N_other, 3D) conditioning, computed once per item
        lengths = self._native_lengths(x_all, mask_all, cond)
        if lengths is not None:
            return self._score_pairs_native(x_all, mask_all, lengths, cond, owner, other)
        kernel = _K_T2I_ROWS if t2i else _K_I2T_ROWS
        compiled = self._compiled(len(ii) * length * d, kernel)
        per_pair = 4 * d * (8 if compiled else 3 * length)
        out = torch.empty(len(ii), dtype=x_all.dtype, device=self._device())
        smooth = torch.as_tensor(self.fovea.smooth, dtype=cond.dtype, device=cond.device)
        for owners, pairs, valid in _row_groups(owner, self._max_pairs(per_pair, compiled)):
            x = x_all[owners]  # (G, L, D)
            mask = None if mask_all is None else mask_all[owners]
            xmax, xmin = _extremes(x, mask)
            per_pair_inputs = _K_ROWS_PREP(cond, other[pairs], xmax, xmin, smooth, compiled=compiled)
            scores = kernel(x, _bias(mask, x), *per_pair_inputs, compiled=compiled)
            out[pairs[valid]] = scores[valid]
        return out

    def _score_pairs_native(self, x_all, mask_all, lengths, cond, owner, other) -> torch.Tensor:
        """:meth:`score_pairs` through the C kernels: each owner's tokens against its own list
        of conditioning rows (``idx``), groups of owners of similar list length at a time."""
        scale, shift, unit = (t.contiguous() for t in self._split(cond))
        out = torch.empty(len(owner), dtype=x_all.dtype, device=self._device())
        for owners, pairs, valid in _row_groups(owner, NATIVE_ROW_PAIRS):
            x = x_all[owners].contiguous()  # (G, L, D)
            xmax, xmin = _extremes(x, None if mask_all is None else mask_all[owners])
            scores = adapt_native.fovea_forward(self.direction, x, lengths[owners].contiguous(), xmax, xmin,
                                                scale, shift, unit, float(self.fovea.smooth), stats=False,
                                                idx=other[pairs])[0]  # (G, T)
            out[pairs[valid]] = scores[valid]
        return out


class AdaptEnsemble(PairScorer):
    """ADAPT-Ens: the average of the score matrices of separately trained ADAPT models."""


    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("model.args.members: an ADAPT ensemble needs at least two models")
        for m in members:
            if not isinstance(m, PairScorer):
                raise ConfigError(f"model.args.members: {type(m).__name__} is not a pair scorer")
        self.members = nn.ModuleList(members)

    # The data pipeline reads the towers to decide how to feed a model (pixels, feature rows,
    # cached frozen outputs): the members' towers are configured alike (checked when built from
    # a config), so the first member's speak for all; properties keep them out of the state dict.
    def tower(self, side: str) -> nn.Module | None:
        return self.members[0].tower(side)

    def needs_training(self) -> bool:
        return False

    def input_needs(self) -> tuple[str, str]:
        return ("tokens", "tokens")

    def encode_image_reps(self, images: Any) -> tuple:
        return tuple(m.encode_image_reps(images) for m in self.members)

    def encode_text_reps(self, texts: Any) -> tuple:
        return tuple(m.encode_text_reps(texts) for m in self.members)

    def score(self, image_reps: tuple, text_reps: tuple) -> torch.Tensor:
        scores = [m.score(i, t) for m, i, t in zip(self.members, image_reps, text_reps)]
        return torch.stack(scores).mean(0)

    def score_pairs(self, image_reps: tuple, text_reps: tuple, image_idx: Any, text_idx: Any) -> torch.Tensor:
        scores = [m.score_pairs(i, t, image_idx, text_idx) for m, i, t in zip(self.members, image_reps, text_reps)]
        return torch.stack(scores).mean(0)

    def first_stage_embeddings(self, image_reps: tuple, text_reps: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The first member's cheap first stage."""
        return self.members[0].first_stage_embeddings(image_reps[0], text_reps[0])


# ------------------------------------------------------------------------------------------
# construction from a config
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptArgs:
    """``model.args`` of ``type: adapt`` (:class:`Adapt`; ``variant: ens`` builds :class:`AdaptEnsemble`)."""

    #: ``t2i`` / ``i2t``: one ADAPT model (its ``direction``); ``ens``: the mean of ``members``
    variant: Literal["t2i", "i2t", "ens"] = "t2i"
    smooth: float = 10.0
    train_smooth: bool = False
    normalization: Literal["batchnorm", "none"] = "batchnorm"
    region_act: Literal["leaky_relu", "none"] = "leaky_relu"
    region_l2norm: bool = True
    word_l2norm: bool = True
    fused: Literal["auto", "native", "compile", "eager"] = "auto"
    chunk_mb: float = 256.0
    #: run folders of separately trained ADAPT models (``variant: ens`` only)
    members: list[str] | None = None
    #: the adapted size; None: the towers' own (equal) output size, unprojected
    latent_dim: int | None = None


MODEL_ARGS["adapt"] = AdaptArgs
#: the fields passed on to :class:`Adapt` as they are
_MODEL_KWARGS = ("smooth", "train_smooth", "normalization", "region_act", "region_l2norm", "word_l2norm",
                 "fused", "chunk_mb")


def _check_args(args: dict | None) -> AdaptArgs:
    out = parse_model_args(AdaptArgs, args, "adapt")
    if out.variant != "ens" and "members" in (args or {}):
        raise ConfigError("model.args.members: only used with variant: ens")
    return out


def _build_ensemble(cfg, args: AdaptArgs) -> nn.Module:
    if not args.members:
        raise ConfigError("model.args.members: variant ens averages separately trained ADAPT runs "
                          "(as the paper does); list their run folders, e.g. [runs/t2i, runs/i2t]")
    rest = [k for k in cfg.args if k not in ("variant", "members")]
    if rest:
        raise ConfigError(f"model.args: {', '.join(rest)} belong to the member runs, not to variant ens")
    from .run import load

    members = args.members
    loaded = [load(str(run)) for run in members]
    # the ensemble reads its data as its members do: their tower configs become its own
    first = loaded[0].config.model
    for run, m in zip(members[1:], loaded[1:]):
        mcfg = m.config.model
        for side in ("image", "text"):
            a, b = getattr(first, side), getattr(mcfg, side)
            if (a.name, a.args, a.frozen) != (b.name, b.args, b.frozen):
                raise ConfigError(f"model.args.members: the members' {side} towers differ ({members[0]}: "
                                  f"{a.name} {a.args} frozen={a.frozen}; {run}: {b.name} {b.args} "
                                  f"frozen={b.frozen}); an ensemble's members must read the same inputs")
    cfg.image, cfg.text = first.image, first.text
    return AdaptEnsemble([r.model for r in loaded])


def build_adapt(cfg) -> nn.Module:
    """Build ADAPT from a :class:`xmodal.config.ModelConfig` (``type: adapt``)."""
    parsed = _check_args(cfg.args)
    if parsed.variant == "ens":
        return _build_ensemble(cfg, parsed)
    variant, latent = parsed.variant, parsed.latent_dim
    args = {k: getattr(parsed, k) for k in _MODEL_KWARGS}
    from .dual import build_towers

    image, text = build_towers(cfg)
    d_img, d_txt = int(image.output_dim), int(text.output_dim)
    if latent is None:
        if d_img != d_txt:
            raise ConfigError(f"model.image / model.text: ADAPT needs one latent size, but the image tower "
                              f"gives {d_img}-d and the text tower {d_txt}-d (set both towers' output size, "
                              f"e.g. model.image.args.out_dim, or model.args.latent_dim to project both)")
        return Adapt(image, text, d_img, direction=variant, frozen_image=cfg.image.frozen,
                     frozen_text=cfg.text.frozen, **args)
    if latent <= 0:
        raise ConfigError(f"model.args.latent_dim: expected a positive size, got {latent}")
    # a side is projected when its tower does not already give the latent size, or is frozen
    # (a frozen tower has nothing trainable before the adaptation)
    proj_img = d_img if (d_img != latent or cfg.image.frozen) else None
    proj_txt = d_txt if (d_txt != latent or cfg.text.frozen) else None
    return Adapt(image, text, latent, direction=variant, frozen_image=cfg.image.frozen,
                 frozen_text=cfg.text.frozen, image_in_dim=proj_img, text_in_dim=proj_txt, **args)


@MODELS.register("adapt")
def _build(cfg) -> nn.Module:
    return build_adapt(cfg)
