"""Planning an IVF-PQ index for collections past memory: a memory estimate and a parameter rule.

An ``ivfpq`` index (:class:`~.faiss_backend.IVFPQBackend`) keeps ``m`` bytes a vector
(``nbits=8``) plus an 8-byte id in RAM instead of ``4 d`` bytes: 10M x 256-d vectors take
~0.7 GB instead of 10 GB. It is trained on a sample, the vectors are added in blocks read from
the index's memory-mapped ``vectors.npy``, and each query's shortlist of ``k * refine`` PQ
candidates is re-scored exactly from that memory map.

:func:`estimate_memory` says what building and holding the index will take, before building;
:func:`choose_params` picks ``nlist``/``m``/``nprobe`` for a memory budget. Nothing here imports
FAISS. The rule (documented in docs/index.md, "IVF-PQ") is our own rather than ``autofaiss``'s:
autofaiss would add pyarrow/fsspec/embedding-reader as dependencies and chooses among index
factory strings by the same two quantities (code bytes a vector, list count ~ sqrt(N)).
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError

#: Rows handed to FAISS per ``add`` call (matches ``faiss_backend.ADD_BLOCK``).
ADD_ROWS = 65536
#: Candidate PQ sub-quantizer counts, best quality first (code bytes a vector with nbits=8).
M_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
#: Bytes a row the :class:`~.store.Index` itself keeps in RAM: its id as a Python string in a
#: list and a dict id -> row (measured 135 B a row for 7-character ids; longer ids cost more).
STORE_BYTES_PER_ROW = 150
#: FAISS builds IVF-PQ L2 look-up tables per list when they fit in this many bytes.
PRECOMPUTED_TABLE_MAX = 2 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


def parse_size(text: str | int, what: str = "--memory-budget") -> int:
    """Bytes in ``"4GB"``, ``"512MiB"``, ``"1.5G"`` or a plain integer (units are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} {text!r}: expected a size such as 4GB, 512MB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"{what} {text!r}: must be positive")
    return value


def auto_ivfpq_nlist(n: int) -> int:
    """Lists for ``n`` vectors: the power of two at or above ``sqrt(n)``, with >= 39 training points a list.

    FAISS suggests 4-16 sqrt(N); on CPU the build's list assignment costs ``n * nlist * d``
    multiply-adds, so we take the low end and let ``nprobe`` buy recall back.
    """
    if n < 39:
        return 1
    nlist = 1 << max(0, math.ceil(math.log2(math.sqrt(n))))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def auto_m(d: int) -> int:
    """Sub-quantizers for ``d`` dims without a budget: the largest choice dividing ``d`` with >= 4 dims each."""
    for m in M_CHOICES:
        if d % m == 0 and d // m >= 4:
            return m
    return 1


def auto_nprobe(nlist: int) -> int:
    """Lists visited a query: 1/64 of them, at least 8 (recall >= 0.9 on the clustered benchmark)."""
    return max(1, min(nlist, max(8, nlist // 64)))


def default_train_size(n: int, nlist: int, nbits: int) -> int:
    """k-means sample: 40 points a list and 40 a PQ centroid, capped at ``n``."""
    return min(n, max(40 * nlist, 40 * (1 << nbits)))


def resolve_params(n: int, d: int, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with every ``None`` (automatic) value decided for ``n`` vectors of ``d`` dims."""
    out = dict(args)
    out["nlist"] = out.get("nlist") or auto_ivfpq_nlist(n)
    out["m"] = out.get("m") or auto_m(d)
    out["nbits"] = out.get("nbits") or 8
    out["nprobe"] = out.get("nprobe") or auto_nprobe(out["nlist"])
    out["refine"] = out.get("refine") or 1
    out["opq"] = bool(out.get("opq", False))
    out["train_size"] = out.get("train_size") or default_train_size(n, out["nlist"], out["nbits"])
    return out


def check_params(n: int, d: int, p: dict[str, Any]) -> None:
    """Refuse parameters FAISS cannot build for ``n`` vectors of ``d`` dims, saying why."""
    if d % p["m"]:
        raise ConfigError(f"ivfpq index: m={p['m']} must divide the dim {d} "
                          f"(choices: {', '.join(str(m) for m in M_CHOICES if d % m == 0)})")
    if not 1 <= p["nbits"] <= 16:
        raise ConfigError(f"ivfpq index: nbits={p['nbits']} must be between 1 and 16 (8 is the fast path)")
    if n and p["nlist"] > n:
        raise ConfigError(f"ivfpq index: nlist={p['nlist']} needs at least {p['nlist']} vectors to train, "
                          f"the index has {n}")
    if n and n < (1 << p["nbits"]):
        raise ConfigError(f"ivfpq index: nbits={p['nbits']} needs at least {1 << p['nbits']} vectors to train "
                          f"its PQ codebooks, the index has {n}; lower nbits or use the ivf/exact backend")


def estimate_memory(n: int, d: int, params: dict[str, Any] | None = None, *, metric: str = "ip",
                    store_rows: bool = True) -> dict[str, int]:
    """Bytes an ``ivfpq`` index of ``n`` x ``d`` vectors needs, by component, with totals.

    ``resident``: what the built index holds (codes, ids, centroids, rotation, tables);
    ``build_peak``: ``resident`` + the training sample and k-means work + one add block +
    the slack of growing inverted lists (std::vector doubling, up to 2x); ``store``: the
    :class:`~.store.Index`'s ids (with ``store_rows``). ``total`` = ``build_peak`` + ``store``.
    The memory-mapped ``vectors.npy`` is not counted: its pages are file cache the kernel can
    drop, which is what lets the collection exceed RAM.
    """
    p = resolve_params(n, d, params or {})
    code = math.ceil(p["m"] * p["nbits"] / 8)
    c = {"codes": n * code, "ids": n * 8,
         "coarse_centroids": p["nlist"] * d * 4,
         "pq_centroids": (1 << p["nbits"]) * d * 4,
         "opq_matrix": d * d * 4 if p["opq"] else 0}
    table = p["nlist"] * p["m"] * (1 << p["nbits"]) * 4
    c["precomputed_table"] = table if metric == "l2" and table <= PRECOMPUTED_TABLE_MAX else 0
    resident = sum(c.values())
    # the sample, its rotated copy and residuals; k-means assignment; one block: float32 copy,
    # rotated copy, residuals and the (block, nprobe=1) assignment
    work = {"train_sample": 3 * p["train_size"] * d * 4 + p["train_size"] * 12,
            "add_block": 3 * min(n, ADD_ROWS) * d * 4 + min(n, ADD_ROWS) * 16,
            "list_growth_slack": n * (code + 8)}
    out = {**c, **work, "resident": resident, "build_peak": resident + sum(work.values()),
           "store": n * STORE_BYTES_PER_ROW if store_rows else 0}
    out["total"] = out["build_peak"] + out["store"]
    return out


def choose_params(n: int, d: int, memory_budget: int | str, *, metric: str = "ip",
                  opq: bool = True, refine: int = 4) -> dict[str, Any]:
    """``ivfpq`` backend arguments for ``n`` vectors of ``d`` dims whose build fits ``memory_budget``.

    ``nlist`` = :func:`auto_ivfpq_nlist`, ``nbits`` = 8 (or fewer when ``n`` is too small to
    train 256 centroids), and the largest ``m`` (code bytes a vector) from :data:`M_CHOICES`
    that divides ``d``, keeps >= 4 dims a sub-quantizer and fits the budget. Raises
    :class:`ConfigError` naming the smallest budget that would do when none fits.
    """
    budget = parse_size(memory_budget)
    if n < 1 or d < 1:
        raise ConfigError(f"choose_params: n={n} and d={d} must be positive")
    nbits = max(1, min(8, int(math.log2(max(n, 78) / 39))))
    base = {"nlist": auto_ivfpq_nlist(n), "nbits": nbits, "opq": opq, "refine": refine}
    base["nprobe"] = auto_nprobe(base["nlist"])
    candidates = [m for m in M_CHOICES if d % m == 0 and (d // m >= 4 or m == 1)]
    for m in candidates:
        params = {**base, "m": m}
        if estimate_memory(n, d, params, metric=metric)["total"] <= budget:
            return resolve_params(n, d, params)
    need = estimate_memory(n, d, {**base, "m": candidates[-1]}, metric=metric)["total"]
    raise ConfigError(f"memory budget {format_bytes(budget)} is too small for an ivfpq index of {n:,} x {d} "
                      f"vectors: the smallest (m={candidates[-1]}) needs about {format_bytes(need)}")


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_estimate(n: int, d: int, params: dict[str, Any], est: dict[str, int]) -> str:
    """A few lines for a person: the parameters and where the memory goes."""
    p = resolve_params(n, d, params)
    head = (f"ivfpq plan for {n:,} x {d}: nlist={p['nlist']} m={p['m']} nbits={p['nbits']} opq={p['opq']} "
            f"nprobe={p['nprobe']} refine={p['refine']} train_size={p['train_size']:,}")
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items()
                      if v and k not in ("resident", "build_peak", "store", "total"))
    return (f"{head}\n  memory estimate: resident {format_bytes(est['resident'])}, build peak "
            f"{format_bytes(est['build_peak'])} + index ids {format_bytes(est['store'])} = "
            f"{format_bytes(est['total'])}\n  ({parts})")
