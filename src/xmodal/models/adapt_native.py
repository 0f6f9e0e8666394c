"""ADAPT's Fovea pass through the C kernels of ``kernels/adapt.c`` (see :mod:`.native`).

The same arithmetic as :mod:`.adapt`'s torch kernels (the docstring there derives it), done
as one loop over each (item, condition) pair's tokens and channels:

- one ``exp`` per token element forward and one backward, with a Cephes-style exponential
  (relative error < 2e-7, as float32 rounding) instead of the library's;
- per pair only ``(D,)`` statistics are written (``Z``, ``E_p[x]``, ``Var_p[x]`` for T2I;
  ``Z``, ``E_p[w]`` and the arg-max word for I2T), no ``(pairs, D)`` temporaries between passes;
- the backward skips pairs whose loss gradient is exactly zero (a hinge loss leaves most pairs
  at zero once its margin is met, and max-violation keeps one negative per row and column);
- padded tokens cost nothing: each item loops over its own real tokens (``lengths``).

Items are split over ``torch.get_num_threads()`` threads by their token counts.
"""
from __future__ import annotations

import ctypes
from typing import Any

import torch

from ..errors import XmodalError
from . import native

_I64, _F = ctypes.c_int64, ctypes.c_float
_P = ctypes.c_void_p
_SIGNATURES = {
    "t2i_fwd": [_I64] * 5 + [_F] + [_P] * 14,
    "i2t_fwd": [_I64] * 5 + [_F] + [_P] * 14,
    "t2i_bwd": [_I64] * 5 + [_F] + [_P] * 16,
    "i2t_bwd": [_I64] * 5 + [_F] + [_P] * 16,
    "xm_exp_array": [_P, _P, _I64],
}
#: floats of scratch per thread (the largest kernel's need: I2T forward, 5 D floats + D int32)
_WORK = 6


def _lib() -> ctypes.CDLL | None:
    lib = native.load("adapt")
    if lib is not None and not getattr(lib, "_xmodal_typed", False):
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        lib._xmodal_typed = True
    return lib


def available() -> bool:
    """Whether the C kernels compiled and loaded here."""
    return _lib() is not None


def require() -> ctypes.CDLL:
    """The kernel library, or an error saying why it cannot be had (``fused: native``)."""
    lib = _lib()
    if lib is None:
        raise XmodalError(f"model.args.fused=native: the C kernels are unavailable ({native.error('adapt')}); "
                          "use fused: auto")
    return lib


def supports(*tensors: torch.Tensor) -> bool:
    """The kernels take float32 CPU tensors."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def lengths_of(mask: torch.Tensor | None, tok: torch.Tensor) -> torch.Tensor | None:
    """Real token counts ``(N,)`` int32, or None when the mask is not a prefix of real tokens
    (or an item has none): then the torch kernels, which take any mask, are used."""
    n, length = tok.shape[:2]
    if mask is None:
        return torch.full((n,), length, dtype=torch.int32)
    lengths = mask.sum(1)
    prefix = torch.arange(length, device=mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, mask) or bool((lengths == 0).any()):
        return None
    return lengths.to(torch.int32).contiguous()


def exp(y: torch.Tensor) -> torch.Tensor:
    """The kernels' exponential over a float32 tensor (for its accuracy test)."""
    y = y.detach().to(torch.float32).contiguous()
    out = torch.empty_like(y)
    require().xm_exp_array(native.ptr(y), native.ptr(out), y.numel())
    return out


def _ranges(lengths: torch.Tensor) -> list[tuple[int, int]]:
    return native.split_work(lengths, torch.get_num_threads())


def fovea_forward(direction: str, tok: torch.Tensor, lengths: torch.Tensor, tmax: torch.Tensor,
                  tmin: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, unit: torch.Tensor,
                  smooth: float, stats: bool, idx: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Scores and ``|v|`` ``(N, C)`` of every token item against every condition row, and
    with ``stats`` the three ``(N, C, D)`` statistics the backward needs. With ``idx``
    ``(N, C)`` (int64) item ``i`` is scored against rows ``idx[i]`` only (re-ranking lists)."""
    lib = require()
    n, length, dim = tok.shape
    c = scale.shape[0] if idx is None else idx.shape[1]
    if idx is not None:
        idx = idx.to(torch.int64).contiguous()
    out, nrm = tok.new_empty(n, c), tok.new_empty(n, c)
    kept: list[torch.Tensor | None] = [None, None, None]
    if stats:
        third = torch.int32 if direction == "i2t" else torch.float32
        kept = [tok.new_empty(n, c, dim), tok.new_empty(n, c, dim), torch.empty((n, c, dim), dtype=third)]
    ranges = _ranges(lengths)
    works = [tok.new_empty(_WORK * dim) for _ in ranges]
    fn = lib.t2i_fwd if direction == "t2i" else lib.i2t_fwd
    args = [native.ptr(a) for a in (tok, lengths, tmax, tmin, scale, shift, unit, idx, out, nrm, *kept)]

    def run(i0: int, i1: int, part: int) -> None:
        fn(i0, i1, c, length, dim, smooth, *args, native.ptr(works[part]))

    native.parallel_for(run, ranges)
    return [out, nrm, *kept]


def fovea_backward(direction: str, tok: torch.Tensor, lengths: torch.Tensor, tmax: torch.Tensor,
                   tmin: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, unit: torch.Tensor,
                   smooth: float, stats: list[torch.Tensor], nrm: torch.Tensor, out: torch.Tensor,
                   grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the tokens ``(N, L, D)`` and of ``unit``, ``shift``, ``scale`` and
    ``k = smooth * scale`` ``(C, D)`` from ``grad = dL/dscores`` ``(N, C)``."""
    lib = require()
    n, length, dim = tok.shape
    c = scale.shape[0]
    g_tok = torch.zeros_like(tok)
    ranges = _ranges(lengths)
    acc = tok.new_zeros(len(ranges), 4, c, dim)  # per thread: unit, shift, scale (less k's part), k
    works = [tok.new_empty(_WORK * dim) for _ in ranges]
    fn = lib.t2i_bwd if direction == "t2i" else lib.i2t_bwd
    args = [native.ptr(a) for a in (tok, lengths, tmax, tmin, scale, shift, unit, *stats, nrm, out, grad, g_tok)]

    def run(i0: int, i1: int, part: int) -> None:
        fn(i0, i1, c, length, dim, smooth, *args, native.ptr(acc[part]), native.ptr(works[part]))

    native.parallel_for(run, ranges)
    g_unit, g_shift, g_scale, g_k = acc.sum(0)  # (C, D) each
    return g_tok, g_unit, g_shift, g_scale + smooth * g_k, g_k


class NativeAdaptScore(torch.autograd.Function):
    """ADAPT training scores ``(N_tok, N_cond)`` with the analytic gradient, in C.

    The interface of :class:`xmodal.models.adapt._AdaptScore`: ``tok`` (N_tok, L, D) the
    adapted side's tokens, ``scale``/``shift``/``unit`` (N_cond, D) the conditioning side's
    ``gamma + 1``, ``beta`` and unit vector, ``smooth`` the Fovea smoothing (0-d);
    ``lengths`` (N_tok,) real token counts and ``tmax``/``tmin`` (N_tok, D) the token extremes.
    """

    @staticmethod
    def forward(ctx: Any, tok, scale, shift, unit, smooth, lengths, tmax, tmin, direction):  # type: ignore[override]
        tensors = [t.detach().contiguous() for t in (tok, scale, shift, unit, tmax, tmin)]
        tok, scale, shift, unit, tmax, tmin = tensors
        out, nrm, *stats = fovea_forward(direction, tok, lengths, tmax, tmin, scale, shift, unit,
                                         float(smooth), stats=True)
        ctx.save_for_backward(tok, scale, shift, unit, smooth, lengths, tmax, tmin, nrm, out, *stats)
        ctx.direction = direction
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        tok, scale, shift, unit, smooth, lengths, tmax, tmin, nrm, out, *stats = ctx.saved_tensors
        g_tok, g_unit, g_shift, g_scale, g_k = fovea_backward(
            ctx.direction, tok, lengths, tmax, tmin, scale, shift, unit, float(smooth), stats, nrm, out,
            grad.detach().to(torch.float32).contiguous())
        g_smooth = (g_k * scale).sum().reshape(smooth.shape) if ctx.needs_input_grad[4] else None
        return g_tok, g_scale, g_shift, g_unit, g_smooth, None, None, None, None
