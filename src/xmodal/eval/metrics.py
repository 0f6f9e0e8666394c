"""Exact, streaming retrieval metrics: Recall@1/5/10, medR, meanR and rsum.

Definitions (the VSE++ / SCAN line; see ``docs/evaluation.md``):

- A query's *rank* is the 0-based rank of its best-ranked positive, counting only
  **non-positive candidates that score strictly higher** than that positive. Ties are
  therefore resolved in favour of the positive, and other positives never push a query down.
- ``R@K`` is the percentage of queries with ``rank < K``; ``medR = floor(median(rank)) + 1``;
  ``meanR = mean(rank) + 1``; ``rsum`` is the sum of the six recalls.
- Image->text (``i2t``) queries are images (positives: the texts of that image); images
  without any text are skipped. Text->image (``t2i``) queries are texts; a text without
  an image (possible only in a :class:`~xmodal.data.base.GroundTruth` passed directly)
  is skipped too. Skipped queries carry rank ``-1``.

The engine never holds the ``N x M`` score matrix. It cuts the larger side (usually the
texts) into blocks of ``block_size`` rows and computes ``S = rows[blk] @ cols.T``
(``block_size x min(N, M)``), getting both directions from that one product:

- Row queries are exact by construction: a block row holds every candidate of that query,
  so its threshold (best positive score) is read from ``S`` itself.
- Column queries need the best score over positives that may live in other blocks. The
  engine first gathers each positive pair's dot product (``nnz x D``, cheap) and a rigorous
  bound ``eps`` on how far the block product can be from it (floating-point error analysis
  of the product's dtype). Per block it counts candidates above ``best + eps`` and keeps
  the few non-positives inside ``(best - eps, best + eps]``; once the best positive score
  *as computed by the block product* is known, those are resolved exactly. The bound is
  verified afterwards; if it ever failed (or the window grew too large) a second pass with
  the exact thresholds is run. Results are therefore exact with respect to the scores the
  block matrix product produces, duplicates and ties included.

Counting uses float 0/1 masks summed by matrix-vector products (exact below ``2**24``),
which measured several times faster on the CPU than summing boolean masks.

Pair scorers (cross-encoders, ADAPT) that cannot produce embeddings use
:func:`ranks_from_score_blocks` (a tile scoring function) or :func:`ranks_from_scores`
(a precomputed matrix); every path ends in :func:`metrics_from_ranks`.
"""
from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..data.base import GroundTruth
from ..progress import make_progress
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Keys of every metrics dict, in display order.
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
#: Rows of the larger side (usually texts) per block. A block costs about
#: ``block_size x min(N, M) x 8`` bytes (scores + mask): 41 MB for COCO 5K. Smaller blocks
#: make the matrix product re-pack the other side more often (benchmarks/eval_speed.py).
DEFAULT_BLOCK_SIZE = 1024
#: Elements per side per chunk when gathering positive scores on the CPU (below torch's
#: parallel grain size of 32768, so each op runs serially out of cache).
_GATHER_ELEMENTS = 16384
#: float32 counts of 0/1 masks are exact below this.
_EXACT_FLOAT_COUNT = 2 ** 24
#: Rows per chunk when checking embeddings for NaN / inf.
_CHECK_CHUNK = 16384

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

# -------------------------------------------------------------------------------------
# input checking and conversion
# -------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Compute dtype of the block products: ``None``/``"fp32"`` -> float32, ``"bf16"`` -> bfloat16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16):
            return dtype
        raise ConfigError(f"dtype: {dtype} is not supported; use fp32 or bf16")
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise ConfigError(f"dtype: unknown value {dtype!r}; use fp32 or bf16")
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None, *inputs: Any) -> torch.device:
    """``None`` -> the device of the first torch input not on the CPU, else the CPU."""
    if device is None:
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                return x.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: cannot parse {device!r} (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not supported; use cpu or cuda")
    return dev


def check_embeddings(x: Any, name: str) -> tuple[int, int]:
    """Check an ``(n, d)`` float array or tensor: right type, 2-D, non-empty, finite.

    Returns ``(n, d)``; raises :class:`DataError` naming ``name`` and the first bad row.
    """
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise DataError(f"{name}: expected floating-point values, got dtype {x.dtype}")
        shape = tuple(x.shape)
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise DataError(f"{name}: expected floating-point values, got dtype {x.dtype}")
        shape = x.shape
    else:
        raise DataError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if len(shape) != 2:
        raise DataError(f"{name}: expected a 2-D array (rows x dim), got shape {shape}")
    n, d = shape
    if n == 0 or d == 0:
        raise DataError(f"{name}: empty array of shape {shape}")
    bad = _first_nonfinite_row(x)
    if bad is not None:
        raise DataError(f"{name}: row {bad} contains NaN or inf")
    return int(n), int(d)


def _first_nonfinite_row(x: Any) -> int | None:
    """Index of the first row holding NaN or inf, or ``None``.

    A row sum is non-finite whenever the row holds NaN or inf, so one cheap reduction
    screens every row; only rows whose sum is not finite (possibly a mere overflow of the
    sum) are inspected element by element.
    """
    for start in range(0, x.shape[0], _CHECK_CHUNK):
        chunk = x[start:start + _CHECK_CHUNK]
        if isinstance(chunk, torch.Tensor):
            sums = chunk.sum(1)  # an overflowing sum only costs a closer look at that row
            suspects = torch.nonzero(~torch.isfinite(sums)).flatten().cpu().numpy()
            for r in suspects:
                if not bool(torch.isfinite(chunk[int(r)]).all()):
                    return start + int(r)
        else:
            chunk = np.asarray(chunk)
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, overflowing sums: suspects
                sums = chunk.sum(1)
            for r in np.flatnonzero(~np.isfinite(sums)):
                if not np.isfinite(chunk[r]).all():
                    return start + int(r)
    return None


def _to_tensor(x: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Input already checked by :func:`check_embeddings` -> contiguous tensor in the compute
    dtype on ``device``, still finite after the cast."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        # A read-only (memory-mapped) array is copied once so torch gets writable memory.
        arr = np.asarray(x)
        if arr.dtype not in (np.float32, np.float64) or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32 if arr.dtype != np.float64 else np.float64, order="C")
        t = torch.from_numpy(arr)
    t = t.to(device=device, dtype=dtype).contiguous()
    wide = x.dtype == torch.float64 if isinstance(x, torch.Tensor) else x.dtype == np.float64
    if wide or dtype != torch.float32:  # a narrowing cast may overflow to inf
        row = _first_nonfinite_row(t)
        if row is not None:
            raise DataError(f"{name}: row {row} overflows {str(dtype).replace('torch.', '')} (values too "
                            "large for the compute dtype)")
    return t


def _int_array(x: Any, what: str) -> np.ndarray:
    """A 1-D integer array as given (range-checked by the caller before any cast)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise DataError(f"{what}: expected a 1-D array of image indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: expected integer image indices, got dtype {arr.dtype}")
    return arr


def as_ground_truth(text_to_images: Any, num_images: int, num_texts: int,
                    what: str = "text-to-image map") -> GroundTruth:
    """Turn a 1-D int array (one image per text), a list of lists of image indices or a
    :class:`GroundTruth` into a checked ``GroundTruth`` of ``num_texts x num_images``."""
    if isinstance(text_to_images, GroundTruth):
        gt = text_to_images
        if gt.num_texts != num_texts or gt.num_images != num_images:
            raise DataError(f"{what}: ground truth is {gt.num_texts} texts x {gt.num_images} images, "
                            f"embeddings are {num_texts} texts x {num_images} images")
        return gt
    if isinstance(text_to_images, (np.ndarray, torch.Tensor)):
        idx = _int_array(text_to_images, what)
        lists = None
    else:
        try:
            items = list(text_to_images)
        except TypeError:
            raise DataError(f"{what}: expected an array, a list of lists or a GroundTruth, "
                            f"got {type(text_to_images).__name__}") from None
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            wide = next((t for t, v in enumerate(items) if not -2 ** 63 <= v < 2 ** 63), None)
            if wide is not None:  # beyond int64: report the value as given
                raise DataError(f"{what}: entry {wide} is image {int(items[wide])}, outside 0..{num_images - 1}")
            idx, lists = np.asarray(items, dtype=np.int64), None
        else:
            idx, lists = None, items
    count = len(idx) if idx is not None else len(lists)
    if count != num_texts:
        raise DataError(f"{what}: has {count} entries but there are {num_texts} texts")
    if idx is not None:
        bad = np.flatnonzero((idx < 0) | (idx >= num_images))
        if len(bad):
            raise DataError(f"{what}: entry {int(bad[0])} is image {int(idx[bad[0]])}, "
                            f"outside 0..{num_images - 1}")
        return GroundTruth(np.arange(num_texts + 1, dtype=np.int64), idx.astype(np.int64), num_images)
    text_idx: list[int] = []
    image_idx: list[int] = []
    for t, entry in enumerate(lists):
        images = [entry] if isinstance(entry, (int, np.integer)) else entry
        if isinstance(images, (str, bytes, dict)) or not hasattr(images, "__iter__"):
            raise DataError(f"{what}: entry {t} must be an image index or a list of them, got {entry!r}")
        images = list(images)
        if not images:
            raise DataError(f"{what}: entry {t} is empty (every text needs at least one image)")
        for i in images:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise DataError(f"{what}: entry {t} holds {i!r}, not an integer image index")
            if not 0 <= i < num_images:
                raise DataError(f"{what}: entry {t} is image {int(i)}, outside 0..{num_images - 1}")
            text_idx.append(t)
            image_idx.append(int(i))
    return GroundTruth.from_pairs(np.asarray(text_idx, np.int64), np.asarray(image_idx, np.int64),
                                  num_texts, num_images)


# -------------------------------------------------------------------------------------
# ranks -> metrics
# -------------------------------------------------------------------------------------
def recall_stats(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medR and meanR of the queries with ``rank >= 0``."""
    r = np.asarray(ranks)
    r = r[r >= 0]
    if len(r) == 0:
        raise DataError("no query has a positive: cannot compute recall")
    return {
        "r1": 100.0 * int(np.count_nonzero(r < 1)) / len(r),
        "r5": 100.0 * int(np.count_nonzero(r < 5)) / len(r),
        "r10": 100.0 * int(np.count_nonzero(r < 10)) / len(r),
        "medr": float(np.floor(np.median(r)) + 1),
        "meanr": float(np.mean(r) + 1),
    }


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """The 11 metrics (:data:`METRIC_KEYS`) from per-query ranks; ranks ``< 0`` are skipped queries."""
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for key, value in recall_stats(ranks).items():
            out[f"{prefix}_{key}"] = value
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def rank1_changes(base_ranks: np.ndarray, new_ranks: np.ndarray, where: str = "ranks") -> dict[str, float]:
    """How two rankings of the same queries differ at rank 1, with an exact sign test.

    ``won``: queries right first under ``new_ranks`` and not under ``base_ranks``; ``lost``: the
    reverse (queries with a rank ``< 0`` in either are skipped). ``p``: the two-sided exact
    sign-test p-value of ``won`` vs ``lost`` (McNemar's exact test on the discordant
    queries): how often a coin would split ``won + lost`` changes at least this unevenly.
    An R@1 gain of a few queries with ``p`` well above 0.05 is within what chance moves.
    """
    a, b = np.asarray(base_ranks), np.asarray(new_ranks)
    if a.shape != b.shape:
        raise DataError(f"{where}: {a.shape[0] if a.ndim else 0} vs {b.shape[0] if b.ndim else 0} queries; "
                        "rank-1 changes compare two rankings of the same queries")
    keep = (a >= 0) & (b >= 0)
    won = int(np.count_nonzero(keep & (a != 0) & (b == 0)))
    lost = int(np.count_nonzero(keep & (a == 0) & (b != 0)))
    n = won + lost
    tail = sum(math.comb(n, i) for i in range(min(won, lost) + 1))
    p = 1.0 if n == 0 or won == lost else min(1.0, 2 * tail / (1 << n))  # exact for any n
    return {"won": won, "lost": lost, "p": p}


# -------------------------------------------------------------------------------------
# the embedding engine
# -------------------------------------------------------------------------------------
def _error_factors(dtype: torch.dtype, dim: int, device: torch.device) -> tuple[float, float]:
    """``(c_acc, c_out)``: ``|block product - gathered product| <= c_acc |x||y| + c_out (|g| + c_acc |x||y|)``.

    A float32-accumulated dot product in any order (FMA or not) satisfies
    ``|fl(x . y) - x . y| <= gamma_D sum_k |x_k y_k| <= gamma_D |x| |y|`` with
    ``gamma_D = D u / (1 - D u)``, ``u = 2^-24``: once for the block product and once for the
    gathered one (``c_acc``), plus input rounding when matmuls may use TF32 / bf16 inputs.
    A bf16 block result is rounded once more, by at most ``2^-8`` of its magnitude
    (``c_out``), which is at most ``|g| + c_acc |x||y|``. Both are doubled for margin; the
    engine verifies the bound afterwards anyway.
    """
    u = 2.0 ** -24
    gamma = dim * u / max(1.0 - dim * u, 1e-3)
    c_acc = 2.0 * (2.0 * gamma + (0.0 if dtype == torch.bfloat16 else _fp32_input_rounding(device)))
    c_out = 2.0 * 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    return c_acc, c_out


def _fp32_input_rounding(device: torch.device) -> float:
    """Relative error of a product when float32 matmuls may round their inputs.

    ``torch.set_float32_matmul_precision("medium")`` lets backends use bf16 inputs (also
    oneDNN on CPUs with AVX512-BF16), ``"high"`` or CUDA's ``allow_tf32`` TF32 inputs.
    """
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 3 * 2.0 ** -8
    tf32 = device.type == "cuda" and bool(getattr(torch.backends.cuda.matmul, "allow_tf32", True))
    if precision == "high" or tf32:
        return 3 * 2.0 ** -11
    return 0.0


@contextmanager
def _exact_bf16_reductions(device: torch.device) -> Iterator[None]:
    """On CUDA, forbid reduced-precision (bf16) split-K reductions so the error bound holds."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = getattr(flags, "allow_bf16_reduced_precision_reduction", None)
    if old is not None:
        flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        if old is not None:
            flags.allow_bf16_reduced_precision_reduction = old


def _progress(total: int, enabled: bool | None):
    """A transient rich progress bar on stderr when it is a TTY (or when forced), else ``None``."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 1:
        return nullcontext(None)
    return make_progress(transient=True, stderr=True)


def _gather_positive_scores(a: torch.Tensor, b: torch.Tensor, pair_a: torch.Tensor, pair_b: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``x . y`` and ``|x| |y|`` of every positive pair in ``dtype`` (inputs upcast exactly).

    On the CPU, chunks stay under torch's parallel grain size: each op then runs on one
    core from L1/L2 without a thread-pool round trip, which on a busy 2-core machine was
    100x faster than large parallel chunks. On CUDA, large chunks amortise launches.
    """
    dots = torch.empty(len(pair_a), dtype=dtype, device=a.device)
    mags = torch.empty_like(dots)
    chunk = 65536 if a.device.type == "cuda" else max(1, _GATHER_ELEMENTS // a.shape[1])
    for s in range(0, len(pair_a), chunk):
        x = a.index_select(0, pair_a[s:s + chunk]).to(dtype)  # (chunk, D)
        y = b.index_select(0, pair_b[s:s + chunk]).to(dtype)
        e = s + len(x)
        torch.linalg.vecdot(x, y, out=dots[s:e])
        torch.mul(torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1), out=mags[s:e])
    return dots, mags


def _round_out(x64: torch.Tensor, down: bool) -> torch.Tensor:
    """float64 -> float32, rounded outwards so the float32 window still contains ``x64``'s window."""
    x32 = x64.float()
    if down:
        return torch.where(x32.double() > x64, torch.nextafter(x32, torch.full_like(x32, -math.inf)), x32)
    return torch.where(x32.double() < x64, torch.nextafter(x32, torch.full_like(x32, math.inf)), x32)


def ranks_prepared(img: torch.Tensor, txt: torch.Tensor, gt: GroundTruth, block_size: int,
                   progress: bool | None = None, *,
                   names: tuple[str, str] = ("image embeddings", "text embeddings"),
                   rows_of: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                   **engine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ranks ``(i2t, t2i)`` for embeddings already checked and converted (same dtype, device).

    The larger side is cut into blocks of ``block_size`` rows and the smaller side is kept
    whole: at equal block memory the matrix product then re-packs the smaller operand per
    block, and fewer, larger products measured ~20 % faster than blocking the smaller side.
    A non-finite score (a float32 / bf16 overflow) is a :class:`DataError` naming both rows:
    ``names`` label the sides and ``rows_of`` map a subset's rows back to the inputs' rows.
    """
    t_of_pair, i_of_pair = gt.pairs()
    img_side, txt_side = (names[0], rows_of[0]), (names[1], rows_of[1])
    if txt.shape[0] >= img.shape[0]:
        check = score_checker(txt, img, lambda r, c: pair_label(img_side, c, txt_side, r))
        t2i, i2t = _stream_ranks(txt, img, t_of_pair, i_of_pair, block_size, progress, check=check, **engine)
    else:
        check = score_checker(img, txt, lambda r, c: pair_label(img_side, r, txt_side, c))
        i2t, t2i = _stream_ranks(img, txt, i_of_pair, t_of_pair, block_size, progress, check=check, **engine)
    return i2t, t2i


#: A bound on every |partial sum| of a dot product below which float32 / bf16 (max about
#: 2**128) cannot overflow; score blocks of inputs under it are not checked.
SAFE_SCORE_BOUND = 2.0 ** 120

ScoreCheck = Callable[[torch.Tensor, int], None]


def score_checker(rows: torch.Tensor, cols: torch.Tensor, label: Callable[[int, int], str]) -> ScoreCheck | None:
    """A check of the score blocks of ``rows @ cols.T``, or ``None`` when they cannot overflow.

    ``D max|rows| max|cols|`` bounds every partial sum of every dot product (one pass over
    each input, no copy), so normal embeddings skip the per-block check entirely.
    """
    def max_abs(t: torch.Tensor) -> float:
        lo, hi = torch.aminmax(t)
        return max(-float(lo), float(hi))

    if rows.shape[0] == 0 or cols.shape[0] == 0:
        return None
    if rows.shape[1] * max_abs(rows) * max_abs(cols) < SAFE_SCORE_BOUND:
        return None

    def check(scores: torch.Tensor, row0: int) -> None:
        if bool(torch.isfinite(scores).all()):
            return
        r, c = (int(v) for v in torch.nonzero(~torch.isfinite(scores))[0])
        raise DataError(f"scores overflow: {label(row0 + r, c)} gives a dot product that is not finite in "
                        f"{str(scores.dtype).replace('torch.', '')} ({float(scores[r, c])}); the embeddings are "
                        "too large: normalise them (or scale them down)")

    return check


def pair_label(a: tuple[str, np.ndarray | None], ra: int, b: tuple[str, np.ndarray | None], rb: int) -> str:
    """``"NAME_A row I · NAME_B row J"``, rows mapped through each side's row map (if any)."""
    def one(side: tuple[str, np.ndarray | None], r: int) -> str:
        name, rows = side
        return f"{name} row {int(rows[r]) if rows is not None else r}"

    return f"{one(a, ra)} \u00b7 {one(b, rb)}"


def _stream_ranks(rows: torch.Tensor, cols: torch.Tensor, pair_row_np: np.ndarray,
                  pair_col_np: np.ndarray, block_size: int, progress: bool | None, *,
                  window_cap: int | None = None, error_factor: float | None = None,
                  counting: str | None = None, check: ScoreCheck | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the row queries and of the column queries of ``S = rows @ cols.T``.

    ``rows`` (R, D) is streamed in blocks, ``cols`` (C, D) is kept whole; positive pairs are
    ``(pair_row_np[k], pair_col_np[k])``. A block holds whole rows, so row thresholds are
    exact in-block; column thresholds use the gathered approximation and the tie window.
    """
    n_rows = rows.shape[0]
    n_cols = cols.shape[0]
    dev = rows.device
    bs = max(1, min(int(block_size), n_rows, _EXACT_FLOAT_COUNT - 1))
    order = np.lexsort((pair_col_np, pair_row_np))  # row-major: block [s, e) owns ptr[s]:ptr[e]
    pr_np, pc_np = pair_row_np[order], pair_col_np[order]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(pr_np, minlength=n_rows))])
    pair_row = torch.from_numpy(pr_np).to(dev)
    pair_col = torch.from_numpy(pc_np).to(dev)
    has_row = np.diff(row_ptr) > 0
    has_col = np.bincount(pc_np, minlength=n_cols) > 0
    has_col_dev = torch.from_numpy(has_col).to(dev)
    lo, hi = _column_windows(rows, cols, pair_row, pair_col, has_col_dev, error_factor, wide=check is not None)

    best_col = torch.full((n_cols,), -math.inf, dtype=torch.float32, device=dev)  # exact, from blocks
    row_rank = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    above = torch.zeros(n_cols, dtype=torch.int64, device=dev)
    window = _TieWindow(max(1 << 20, 2 * bs * n_cols) if window_cap is None else window_cap)

    s_buf = torch.empty((bs, n_cols), dtype=rows.dtype, device=dev)
    if counting is None:
        counting = "mask_sum" if dev.type == "cuda" or n_cols >= _EXACT_FLOAT_COUNT else "float_mv"
    count_rows, count_cols, w_buf = _block_counters(counting, rows.dtype, bs, n_cols, dev)
    cols_t = cols.t()
    starts = range(0, n_rows, bs)

    def block_scores(s: int) -> torch.Tensor:
        e = min(s + bs, n_rows)
        out = torch.mm(rows[s:e], cols_t, out=s_buf[:e - s])  # (b, C)
        return out if w_buf is None else w_buf[:e - s].copy_(out)

    with _exact_bf16_reductions(dev), _progress(len(starts), progress) as bar:
        task = bar.add_task("scoring blocks", total=len(starts)) if bar else None
        for s in starts:
            e = min(s + bs, n_rows)
            b = e - s
            scores = block_scores(s)
            if check is not None:
                check(scores, s)
            p0, p1 = int(row_ptr[s]), int(row_ptr[e])
            r_idx = pair_row[p0:p1] - s
            c_idx = pair_col[p0:p1]
            vals = scores.view(-1).index_select(0, r_idx * n_cols + c_idx).float()
            best_col.scatter_reduce_(0, c_idx, vals, "amax")

            # Row queries: the whole row is here, so the threshold is exact.
            best_row = torch.full((b,), -math.inf, dtype=torch.float32, device=dev)
            best_row.scatter_reduce_(0, r_idx, vals, "amax")
            best_row.masked_fill_(best_row == -math.inf, math.inf)  # no positive: count nothing
            row_rank[s:e] = count_rows(scores, best_row).long()

            # Column queries: definite non-positives above the window, and the window itself.
            n_hi = count_cols(scores, hi)
            above += n_hi.long()
            n_lo = count_cols(scores, lo)
            # Positives always sit in their own window and never count: leave them out so
            # that only columns with a non-positive near their threshold are inspected.
            n_lo.index_put_((c_idx,), -(vals > lo[c_idx]).to(n_lo.dtype), accumulate=True)
            window.collect(scores, n_lo, n_hi, lo, hi)
            if bar:
                bar.advance(task)

    col_rank = _column_ranks(window, above, best_col, lo, hi, has_col_dev, starts, count_cols, block_scores)

    row_np = row_rank.cpu().numpy()
    col_np = col_rank.cpu().numpy()
    row_np[~has_row] = -1
    col_np[~has_col] = -1
    return row_np, col_np


def _column_windows(rows: torch.Tensor, cols: torch.Tensor, pair_row: torch.Tensor, pair_col: torch.Tensor,
                    has_col_dev: torch.Tensor, error_factor: float | None,
                    wide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(lo, hi)`` per column: the window that must hold its block-product threshold.

    ``wide``: gather in float64 (inputs so large that float32 norms could overflow)."""
    n_cols = cols.shape[0]
    dim = rows.shape[1]
    dev = rows.device
    # Approximate column thresholds and the window that must contain the block-product
    # value: the gathered and the block dot products are both within gamma_D |x| |y| of exact.
    dots, mags = _gather_positive_scores(rows, cols, pair_row, pair_col, torch.float64 if wide else torch.float32)
    approx = torch.full((n_cols,), -math.inf, dtype=dots.dtype, device=dev).scatter_reduce_(
        0, pair_col, dots, "amax").double()
    mag = mags.double() * 1.01  # 1 %: rounding of the norms themselves
    c_acc, c_out = _error_factors(rows.dtype, dim, dev)
    if error_factor is not None:  # tests: force a (too) tight bound
        c_acc, c_out = error_factor, 0.0
    pair_eps = c_acc * mag + c_out * (dots.double().abs() + c_acc * mag)
    # |max_i a_i - max_i b_i| <= max_i |a_i - b_i|: the column bound is the largest pair bound.
    eps = torch.zeros(n_cols, dtype=torch.float64, device=dev).scatter_reduce_(
        0, pair_col, pair_eps, "amax") + 1e-30
    inf64 = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    lo = _round_out(torch.where(has_col_dev, approx - eps, inf64), down=True)
    hi = _round_out(torch.where(has_col_dev, approx + eps, inf64), down=False)
    return lo, hi


_CountFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _column_ranks(window: _TieWindow, above: torch.Tensor, best_col: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, has_col_dev: torch.Tensor, starts: range, count_cols: _CountFn,
                  block_scores: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Column ranks from the tie window, or from a second, exact pass if it overflowed or the bound failed."""
    n_cols = len(best_col)
    dev = best_col.device
    log.debug("tie window held %d candidates within the rounding bound of a threshold", window.count)
    inside_ok = bool(((lo <= best_col) & (best_col <= hi))[has_col_dev].all())
    if not inside_ok:
        log.warning("floating-point error bound exceeded (unusual BLAS?); "
                    "running a second, exact pass for the column queries")
    if window.overflow or not inside_ok:
        col_rank = torch.zeros(n_cols, dtype=torch.int64, device=dev)
        with _exact_bf16_reductions(dev):
            for s in starts:
                col_rank += count_cols(block_scores(s), best_col).long()
    else:
        col_rank = window.column_ranks(above, best_col, n_cols)
    return col_rank


def _block_counters(counting: str, dtype: torch.dtype, bs: int, n_cols: int,
                    dev: torch.device) -> tuple[_CountFn, _CountFn, torch.Tensor | None]:
    """``(count_rows, count_cols, w_buf)`` for a counting mode; ``w_buf`` widens bf16 blocks (or None)."""
    if counting == "float_mv":
        # CPU: 0/1 float masks summed by matrix-vector products (exact below 2**24) measured
        # 5-10x faster than summing boolean masks. bf16 blocks are widened once (exactly) to
        # float32 first: bf16 comparisons measured 2x slower, and there are three per block.
        f_buf = torch.empty((bs, n_cols), dtype=torch.float32, device=dev)
        ones_c = torch.ones(n_cols, dtype=torch.float32, device=dev)
        ones_b = torch.ones(bs, dtype=torch.float32, device=dev)
        w_buf = torch.empty((bs, n_cols), dtype=torch.float32, device=dev) if dtype != torch.float32 else None

        def count_rows(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
            """Per row of ``scores``: entries above that row's ``thr``."""
            return torch.mv(torch.gt(scores, thr[:, None], out=f_buf[:len(scores)]), ones_c)

        def count_cols(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
            """Per column of ``scores``: entries above that column's ``thr``."""
            return torch.mv(torch.gt(scores, thr, out=f_buf[:len(scores)]).t(), ones_b[:len(scores)])
    elif counting == "mask_sum":
        # GPU: memory-bound, so compare the block in its own dtype into 1-byte masks and let
        # the reduction kernels count (no widened copy, no 4-byte masks).
        w_buf = None

        def count_rows(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
            return (scores > thr[:, None]).sum(1, dtype=torch.int32)

        def count_cols(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
            return (scores > thr).sum(0, dtype=torch.int32)
    else:
        raise ValueError(f"unknown counting mode {counting!r}")
    return count_rows, count_cols, w_buf


class _TieWindow:
    """Non-positive candidates within ``(lo, hi]`` of a column threshold, up to ``cap`` entries."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.cols: list[torch.Tensor] = []
        self.vals: list[torch.Tensor] = []
        self.count = 0
        self.overflow = False

    def collect(self, scores: torch.Tensor, n_lo: torch.Tensor, n_hi: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor) -> None:
        """Keep the block's window entries of the columns whose counts above ``lo`` and ``hi`` differ."""
        if self.overflow:
            return
        amb = torch.nonzero(n_lo != n_hi).flatten()
        if len(amb):
            sub = scores.index_select(1, amb)  # (b, A)
            inside = (sub > lo[amb]) & (sub <= hi[amb])
            r, k = torch.nonzero(inside, as_tuple=True)
            self.cols.append(amb[k])
            self.vals.append(sub[r, k].float())
            self.count += len(r)
            if self.count > self.cap:
                self.overflow = True
                self.cols.clear()
                self.vals.clear()
                log.info("tie window exceeded %d entries; a second pass will resolve it", self.cap)

    def column_ranks(self, above: torch.Tensor, best_col: torch.Tensor, n_cols: int) -> torch.Tensor:
        """Column ranks: candidates above the window plus window entries above the exact threshold."""
        col_rank = above
        if self.cols:
            wc = torch.cat(self.cols)
            wv = torch.cat(self.vals)
            col_rank = col_rank + torch.bincount(wc[wv > best_col[wc]], minlength=n_cols)
        return col_rank


def prepare_inputs(image_emb: Any, text_emb: Any, text_to_images: Any, *,
                   device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None,
                   names: tuple[str, str, str] = ("image embeddings", "text embeddings", "text-to-image map"),
                   ) -> tuple[torch.Tensor, torch.Tensor, GroundTruth]:
    """Check and convert inputs once: ``(images (N, D), texts (M, D), GroundTruth)``."""
    dev = resolve_device(device, image_emb, text_emb)
    dt = resolve_dtype(dtype)
    n, d_img = check_embeddings(image_emb, names[0])
    m, d_txt = check_embeddings(text_emb, names[1])
    if d_img != d_txt:
        raise DataError(f"{names[0]} are {d_img}-d but {names[1]} are {d_txt}-d")
    gt = as_ground_truth(text_to_images, n, m, names[2])
    if gt.nnz == 0:
        raise DataError(f"{names[2]}: no positive pair at all")
    img = _to_tensor(image_emb, names[0], dt, dev)
    txt = _to_tensor(text_emb, names[1], dt, dev)
    return img, txt, gt


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ConfigError(f"block_size: expected a positive integer, got {block_size!r}")
    return int(block_size)


@torch.no_grad()
def ranks_from_embeddings(image_emb: Any, text_emb: Any, text_to_images: Any, *,
                          block_size: int = DEFAULT_BLOCK_SIZE,
                          device: str | torch.device | None = None,
                          dtype: str | torch.dtype | None = None,
                          progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ranks ``(i2t_ranks (N,), t2i_ranks (M,))`` for dot-product scores.

    ``image_emb`` (N x D) and ``text_emb`` (M x D) are numpy arrays or torch tensors (not
    normalised here: pass normalised embeddings for cosine scores); ``text_to_images`` is a
    1-D int array, a list of lists of image indices or a :class:`GroundTruth`. Peak extra
    memory is about ``block_size x min(N, M) x 8`` bytes (12 for bf16) plus the converted
    inputs. Skipped queries get ``-1``.
    """
    block_size = check_block_size(block_size)
    img, txt, gt = prepare_inputs(image_emb, text_emb, text_to_images, device=device, dtype=dtype)
    return ranks_prepared(img, txt, gt, block_size, progress)


# -------------------------------------------------------------------------------------
# pair scorers: arbitrary tile scores
# -------------------------------------------------------------------------------------
ScoreFn = Callable[[slice, slice], Any]


def _tile_scores(score_fn: ScoreFn, si: slice, st: slice, device: torch.device | None) -> torch.Tensor:
    out = score_fn(si, st)
    t = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if device is not None:
        t = t.to(device)
    want = (si.stop - si.start, st.stop - st.start)
    if tuple(t.shape) != want:
        raise DataError(f"score function returned shape {tuple(t.shape)} for images "
                        f"{si.start}:{si.stop} x texts {st.start}:{st.stop}; expected {want}")
    if not t.is_floating_point():
        t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"score function returned NaN or inf for images {si.start}:{si.stop} x "
                        f"texts {st.start}:{st.stop}")
    return t


@torch.no_grad()
def ranks_from_score_blocks(score_fn: ScoreFn, num_images: int, num_texts: int, gt: Any,
                            image_block: int = 1024, text_block: int = 8192, *,
                            device: str | torch.device | None = None,
                            cache_bytes: int = 256 << 20,
                            progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ranks from a tile scoring function, for models that score pairs.

    ``score_fn(img_slice, txt_slice)`` returns the ``(bi, bt)`` scores of images
    ``img_slice`` against texts ``txt_slice`` (python ``slice`` objects over
    ``0..num_images`` / ``0..num_texts``); higher is better. ``gt`` is anything
    :func:`as_ground_truth` accepts. The grid of ``image_block x text_block`` tiles is
    visited in two phases: first the tiles holding positive pairs (their scores give each
    query's exact threshold; kept in memory up to ``cache_bytes``), then every tile, counting
    strictly higher-scoring candidates. A tile that holds positives is scored twice unless
    cached, so ``score_fn`` must be deterministic (this is checked on the positives). Memory
    is bounded by one tile plus the cache. Same rank semantics as :func:`ranks_from_embeddings`.
    """
    n, m = int(num_images), int(num_texts)
    if n < 1 or m < 1:
        raise DataError(f"need at least one image and one text, got {n} x {m}")
    ib = check_block_size(image_block)
    tb = check_block_size(text_block)
    gt = as_ground_truth(gt, n, m)
    if gt.nnz == 0:
        raise DataError("ground truth: no positive pair at all")
    dev = torch.device(device) if device is not None else None
    grid = _TileGrid(gt, n, m, ib, tb)
    total = len(grid.tiles) + ((n + ib - 1) // ib) * grid.n_tb
    with _progress(total, progress) as bar:
        task = bar.add_task("scoring tiles", total=total) if bar else None
        best_i, best_t, pos_vals, cache = _tile_thresholds(score_fn, grid, gt.nnz, dev, cache_bytes, bar, task)
        i2t, t2i = _count_tiles(score_fn, grid, best_i, best_t, pos_vals, cache, dev, bar, task)
    i2t_np = i2t.cpu().numpy()
    t2i_np = t2i.cpu().numpy()
    i2t_np[np.bincount(grid.i_of_pair, minlength=n) == 0] = -1
    t2i_np[gt.counts() == 0] = -1
    return i2t_np, t2i_np


class _TileGrid:
    """The ``image_block x text_block`` tiles of an ``n x m`` score matrix and the positive pairs in each."""

    def __init__(self, gt: GroundTruth, n: int, m: int, ib: int, tb: int) -> None:
        self.n, self.m, self.ib, self.tb = n, m, ib, tb
        self.t_of_pair, self.i_of_pair = gt.pairs()
        self.n_tb = (m + tb - 1) // tb  # tile key = image block * n_tb + text block
        pair_tile = (self.i_of_pair // ib) * self.n_tb + self.t_of_pair // tb
        self.tiles = np.unique(pair_tile)
        self.order = np.argsort(pair_tile, kind="stable")
        self.sorted_tile = pair_tile[self.order]

    def slices(self, key: int) -> tuple[slice, slice]:
        """The image and text slices of tile ``key``."""
        a, b = divmod(int(key), self.n_tb)
        return (slice(a * self.ib, min(a * self.ib + self.ib, self.n)),
                slice(b * self.tb, min(b * self.tb + self.tb, self.m)))

    def pairs(self, key: int) -> np.ndarray:
        """Indices of the positive pairs inside tile ``key``."""
        lo_, hi_ = np.searchsorted(self.sorted_tile, [key, key + 1])
        return self.order[lo_:hi_]

    def local(self, p: np.ndarray, si: slice, st: slice,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of pairs ``p`` inside the tile at ``(si, st)``."""
        r = torch.from_numpy(self.i_of_pair[p] - si.start).to(device)
        k = torch.from_numpy(self.t_of_pair[p] - st.start).to(device)
        return r, k


def _tile_thresholds(score_fn: ScoreFn, grid: _TileGrid, nnz: int, dev: torch.device | None,
                     cache_bytes: int, bar: Any, task: Any,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Phase 1: ``(best_i, best_t, pos_vals, cache)`` from the tiles holding positives."""
    n, m = grid.n, grid.m
    best_i: torch.Tensor | None = None
    best_t: torch.Tensor | None = None
    pos_vals = None
    cache: dict[int, torch.Tensor] = {}
    cached = 0
    for key in grid.tiles:  # phase 1: thresholds from the tiles holding positives
        si, st = grid.slices(key)
        scores = _tile_scores(score_fn, si, st, dev)
        if best_i is None:
            acc = torch.promote_types(scores.dtype, torch.float32)
            best_i = torch.full((n,), -math.inf, dtype=acc, device=scores.device)
            best_t = torch.full((m,), -math.inf, dtype=acc, device=scores.device)
            pos_vals = torch.empty(nnz, dtype=acc, device=scores.device)
        p = grid.pairs(key)
        r, k = grid.local(p, si, st, scores.device)
        v = scores[r, k].to(best_i.dtype)
        pos_vals[torch.from_numpy(p).to(scores.device)] = v
        best_i.scatter_reduce_(0, r + si.start, v, "amax")
        best_t.scatter_reduce_(0, k + st.start, v, "amax")
        size = scores.numel() * scores.element_size()
        if cached + size <= cache_bytes:
            cache[int(key)] = scores
            cached += size
        if bar:
            bar.advance(task)
    assert best_i is not None and best_t is not None and pos_vals is not None
    return best_i, best_t, pos_vals, cache


def _count_tiles(score_fn: ScoreFn, grid: _TileGrid, best_i: torch.Tensor, best_t: torch.Tensor,
                 pos_vals: torch.Tensor, cache: dict[int, torch.Tensor], dev: torch.device | None,
                 bar: Any, task: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2: per image and per text, the candidates of every tile scoring strictly higher."""
    i2t = torch.zeros(grid.n, dtype=torch.int64, device=best_i.device)
    t2i = torch.zeros(grid.m, dtype=torch.int64, device=best_i.device)
    positive_tiles = set(int(k) for k in grid.tiles)
    for key in range((grid.n + grid.ib - 1) // grid.ib * grid.n_tb):  # phase 2: count strictly higher scores
        si, st = grid.slices(key)
        scores = cache.pop(key, None)
        if scores is None:
            scores = _tile_scores(score_fn, si, st, dev)
            if key in positive_tiles:
                p = grid.pairs(key)
                r, k = grid.local(p, si, st, scores.device)
                again = scores[r, k].to(pos_vals.dtype)
                if not torch.equal(again, pos_vals[torch.from_numpy(p).to(scores.device)]):
                    raise DataError("score function is not deterministic: the same tile scored "
                                    "differently twice; raise cache_bytes or fix the scorer")
        scores = scores.to(best_i.device)
        i2t[si] += (scores > best_i[si, None]).sum(1)
        t2i[st] += (scores > best_t[None, st]).sum(0)
        if bar:
            bar.advance(task)
    return i2t, t2i


def ranks_from_scores(scores: Any, text_to_images: Any, *, block_size: int = 1024,
                      progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ranks from a precomputed ``(N images, M texts)`` score matrix (array or tensor).

    The matrix is read in row blocks of ``block_size`` images, so a memory-mapped array is
    never loaded whole. Transpose a ``texts x images`` matrix (as UNITER stores it) first.
    """
    if isinstance(scores, torch.Tensor):
        shape = tuple(scores.shape)
    else:
        scores = np.asarray(scores)
        shape = scores.shape
    if len(shape) != 2 or 0 in shape:
        raise DataError(f"scores: expected a non-empty 2-D (images x texts) matrix, got shape {shape}")
    n, m = shape

    def score_fn(si: slice, st: slice) -> torch.Tensor:
        blk = scores[si, st]
        return blk if isinstance(blk, torch.Tensor) else torch.from_numpy(np.array(blk))

    return ranks_from_score_blocks(score_fn, n, m, text_to_images, block_size, m,
                                   cache_bytes=0, progress=progress)
