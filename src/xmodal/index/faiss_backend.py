"""FAISS backends: ``flat`` (exact), ``ivf`` (IndexIVFFlat), ``ivfpq`` (OPQ + IndexIVFPQ) and ``hnsw``.

FAISS is an optional extra (``pip install 'xmodal[faiss]'``) imported only when one of these
backends is built or loaded. State is serialised with ``faiss.write_index`` into the index
folder's ``faiss.index`` (FAISS's own binary format, never pickle); the folder's
``vectors.npy`` stays the source of truth, so any backend can be rebuilt from it.

Search-time knobs (``nprobe``, ``ef_search``) are passed per call as FAISS
``SearchParameters`` rather than set on the shared index, so concurrent searches with
different settings do not race.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, DataError, XmodalError, where
from ..progress import track
from .exact import BACKENDS, PAD_SCORE, Backend, VectorSource
from .ivfpq import check_params, resolve_params

log = logging.getLogger(__name__)

#: Rows handed to ``faiss.Index.add`` at a time (bounds the float32 copy of float16 storage).
ADD_BLOCK = 65536


def import_faiss() -> Any:
    """The ``faiss`` module, or an :class:`XmodalError` saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise XmodalError("FAISS index backends (flat, ivf, hnsw) need the optional faiss extra: "
                          "pip install 'xmodal[faiss]' (or use backend='exact')") from e
    return faiss


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: about ``4 * sqrt(n)``, capped so k-means has >= 39 points a list."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


class FaissBackend(Backend):
    """Shared plumbing: build/extend in blocks, search with per-call parameters, (de)serialise."""

    file = "faiss.index"
    #: FAISS class the loaded index must be an instance of (after ``downcast_index``).
    faiss_class: ClassVar[str] = ""

    def __init__(self, dim: int, metric: str, args: dict[str, Any] | None = None) -> None:
        super().__init__(dim, metric, args)
        self.faiss = import_faiss()
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _faiss_metric(self) -> int:
        f = self.faiss
        return f.METRIC_INNER_PRODUCT if self.metric == "ip" else f.METRIC_L2

    def _new(self, n: int) -> Any:
        """An empty FAISS index sized for ``n`` vectors."""
        raise NotImplementedError

    def _train(self, source: VectorSource) -> None:
        """Train on ``source`` when the index type needs it."""

    def _params(self, args: dict[str, Any], k: int) -> Any:
        """FAISS ``SearchParameters`` for one call, or None."""
        return None

    def _faiss_type(self) -> type:
        """The FAISS class a loaded ``faiss.index`` must be an instance of."""
        return getattr(self.faiss, self.faiss_class)

    def build(self, source: VectorSource, progress: bool = False) -> None:
        t0 = time.perf_counter()
        self.index = self._new(len(source))
        self._train(source)
        self._add_rows(source, 0, progress)
        log.info("built %s index over %d vectors in %.1fs", self.name, len(source), time.perf_counter() - t0)

    def extend(self, source: VectorSource, progress: bool = False) -> None:
        if self.index is None:
            self.build(source, progress)
        else:
            self._add_rows(source, self.ntotal, progress)

    def _add_rows(self, source: VectorSource, start: int, progress: bool) -> None:
        todo = len(source) - start
        if todo <= 0:
            return
        n_blocks = -(-todo // ADD_BLOCK)
        for _, block in track(source.blocks(ADD_BLOCK, start), f"adding to {self.name} index",
                              total=n_blocks, enabled=progress and n_blocks > 1):
            self.index.add(np.ascontiguousarray(block, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, source: VectorSource,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        nq = queries.shape[0]
        if self.ntotal == 0 or nq == 0:
            return np.full((nq, k), PAD_SCORE, np.float32), np.full((nq, k), -1, np.int64)
        dist, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k,
                                      params=self._params({**self.args, **params}, k))
        # FAISS returns distances for L2 (ascending); negate so every backend is "higher is better"
        scores = np.asarray(dist, dtype=np.float32) if self.metric == "ip" else -np.asarray(dist, np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = PAD_SCORE
        return scores, ids

    def save(self, path: Path) -> None:
        if self.index is None:  # an index that never held a vector: store the empty structure
            self.index = self._new(0)
        self.faiss.write_index(self.index, str(path))

    def load(self, path: Path, count: int, info: dict[str, Any] | None = None) -> None:
        f = self.faiss
        try:
            # read_index already returns the concrete class (downcast_index would hand out a
            # second proxy whose owner gets garbage-collected)
            index = f.read_index(str(path))
        except RuntimeError as e:
            msg = str(e).strip().splitlines()
            raise DataError(f"{where(path)}cannot be read as a FAISS index"
                            f" ({msg[-1] if msg else 'read error'})") from None
        expected = self._faiss_type()
        if not isinstance(index, expected):
            raise DataError(f"{where(path)}holds a {type(index).__name__}, but manifest.json says "
                            f"backend {self.name!r} ({self.faiss_class})")
        if index.d != self.dim:
            raise DataError(f"{where(path)}has dim {index.d}, manifest.json says {self.dim}")
        if index.metric_type != self._faiss_metric():
            raise DataError(f"{where(path)}uses FAISS metric {index.metric_type}, "
                            f"manifest.json says {self.metric!r}")
        if index.ntotal != count:
            raise DataError(f"{where(path)}holds {index.ntotal} vectors, manifest.json says {count}")
        self.index = index


@BACKENDS.register("flat")
class FlatBackend(FaissBackend):
    """``IndexFlatIP`` / ``IndexFlatL2``: exact, FAISS's SIMD kernels, vectors held in RAM."""

    name = "flat"
    exhaustive = True
    faiss_class = "IndexFlat"
    defaults: ClassVar[dict[str, Any]] = {}

    def _new(self, n: int) -> Any:
        f = self.faiss
        return f.IndexFlatIP(self.dim) if self.metric == "ip" else f.IndexFlatL2(self.dim)


@BACKENDS.register("ivf")
class IVFBackend(FaissBackend):
    """``IndexIVFFlat``: k-means lists, search visits ``nprobe`` of ``nlist`` lists.

    ``nlist`` defaults to :func:`auto_nlist` of the collection size at build time. k-means
    runs on a random sample of ``train_size`` vectors (default ``40 * nlist``, just above FAISS's
    39-points-per-centroid warning; more points cost time and buy little). Vectors added later
    go into the existing lists; with an automatic ``nlist``, the index retrains once the
    collection has grown :attr:`RETRAIN_GROWTH` times since training, which keeps ``nlist``
    near ``4 * sqrt(N)`` at an amortised O(N) cost.
    """

    name = "ivf"
    faiss_class = "IndexIVFFlat"
    defaults: ClassVar[dict[str, Any]] = {"nlist": None, "nprobe": 16, "train_size": None,
                                          "niter": 10, "seed": 0}
    search_params = ("nprobe",)
    RETRAIN_GROWTH = 4

    def __init__(self, dim: int, metric: str, args: dict[str, Any] | None = None) -> None:
        super().__init__(dim, metric, args)
        self.trained_on = 0  # collection size when k-means ran

    def _new(self, n: int) -> Any:
        f = self.faiss
        nlist = self.args["nlist"] or auto_nlist(n)
        if n and nlist > n:
            raise ConfigError(f"ivf index: nlist={nlist} needs at least {nlist} vectors to train, "
                              f"the index has {n}")
        quantizer = f.IndexFlatIP(self.dim) if self.metric == "ip" else f.IndexFlatL2(self.dim)
        index = f.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric())
        index.cp.niter = self.args["niter"]
        index.cp.seed = self.args["seed"]
        # inner product assignment to unnormalised centroids favours long ones: keep them on the sphere
        index.cp.spherical = self.metric == "ip"
        index.nprobe = self.args["nprobe"]
        return index

    def _train(self, source: VectorSource) -> None:
        n = len(source)
        if n == 0:
            return  # trained on the first extend
        nlist = self.index.nlist
        size = min(n, self.args["train_size"] or 40 * nlist)
        rng = np.random.default_rng(self.args["seed"])
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        t0 = time.perf_counter()
        self.index.train(source.take(rows))
        self.trained_on = n
        log.info("trained ivf (nlist=%d) on %d of %d vectors in %.1fs", nlist, size, n, time.perf_counter() - t0)

    def extend(self, source: VectorSource, progress: bool = False) -> None:
        grown = (self.args["nlist"] is None and self.trained_on
                 and len(source) > self.RETRAIN_GROWTH * self.trained_on)
        if self.index is None or not self.index.is_trained or grown:
            if grown:
                log.info("ivf: collection grew from %d to %d vectors since training; retraining",
                         self.trained_on, len(source))
            self.build(source, progress)
        else:
            self._add_rows(source, self.ntotal, progress)

    def _params(self, args: dict[str, Any], k: int) -> Any:
        return self.faiss.SearchParametersIVF(nprobe=args["nprobe"])

    def load(self, path: Path, count: int, info: dict[str, Any] | None = None) -> None:
        super().load(path, count, info)
        self.trained_on = int((info or {}).get("trained_on", count))

    def info(self) -> dict[str, Any]:
        if self.index is None:
            return {}
        return {"nlist": int(self.index.nlist), "trained_on": int(self.trained_on)}


@BACKENDS.register("hnsw")
class HNSWBackend(FaissBackend):
    """``IndexHNSWFlat``: graph search; ``M`` links a node, ``ef_construction`` / ``ef_search`` beams.

    Supports incremental add; no training. Memory is the vectors plus about ``M * 2 * 4`` bytes
    of links a vector; build is the slow part (see docs/index.md).
    """

    name = "hnsw"
    faiss_class = "IndexHNSWFlat"
    # ef_construction 128 rather than FAISS's 40: on 1M clustered vectors 40 capped recall@10
    # near 0.88 whatever ef_search, 128 reached 0.96 at ef_search 64 (docs/index.md)
    defaults: ClassVar[dict[str, Any]] = {"M": 32, "ef_construction": 128, "ef_search": 64}
    search_params = ("ef_search",)

    def _new(self, n: int) -> Any:
        index = self.faiss.IndexHNSWFlat(self.dim, self.args["M"], self._faiss_metric())
        index.hnsw.efConstruction = self.args["ef_construction"]
        index.hnsw.efSearch = self.args["ef_search"]
        return index

    def _params(self, args: dict[str, Any], k: int) -> Any:
        # a beam narrower than k cannot return k results
        return self.faiss.SearchParametersHNSW(efSearch=max(args["ef_search"], k))

    def info(self) -> dict[str, Any]:
        if self.index is None:
            return {}
        return {"max_level": int(self.index.hnsw.max_level)}


@BACKENDS.register("ivfpq")
class IVFPQBackend(FaissBackend):
    """``IndexIVFPQ`` (behind an ``OPQMatrix`` rotation with ``opq``): for collections past memory.

    Each vector is held as ``m`` bytes of product-quantised code (``nbits=8``) in one of
    ``nlist`` k-means lists, so RAM holds ``n * (m + 8)`` bytes instead of ``4 n d``. Training
    (OPQ rotation, k-means, PQ codebooks) runs on a random sample of ``train_size`` rows; the
    vectors are then added in blocks of :data:`ADD_BLOCK` rows read from the memory map.
    A query takes ``k * refine`` candidates from the lists and re-scores them exactly from
    ``vectors.npy`` (``refine=1``: PQ scores only). ``None`` arguments are decided at build time
    (:func:`.ivfpq.resolve_params`; :func:`.ivfpq.choose_params` fits them to a memory budget).
    Rows added later go into the trained lists; :meth:`Index.rebuild` retrains.
    """

    name = "ivfpq"
    faiss_class = "IndexIVFPQ"
    defaults: ClassVar[dict[str, Any]] = {"nlist": None, "m": None, "nbits": 8, "opq": True, "nprobe": None,
                                          "refine": 4, "train_size": None, "niter": 10, "seed": 0}
    search_params = ("nprobe", "refine")
    #: queries re-scored at a time (bounds the (block, k * refine, d) gather)
    REFINE_BLOCK = 256

    def __init__(self, dim: int, metric: str, args: dict[str, Any] | None = None) -> None:
        super().__init__(dim, metric, args)
        self.trained_on = 0
        self.resolved: dict[str, Any] = {}

    @classmethod
    def check_args(cls, args: dict[str, Any], *, search: bool = False) -> dict[str, Any]:
        if search or "opq" not in args:
            return super().check_args(args, search=search)
        opq = args["opq"]
        if not isinstance(opq, bool) and not (type(opq) is int and opq in (0, 1)):
            raise ConfigError(f"ivfpq index: opq={opq!r} must be true or false")
        rest = super().check_args({k: v for k, v in args.items() if k != "opq"})
        return {**rest, "opq": bool(opq)}

    def _new(self, n: int) -> Any:
        f = self.faiss
        p = resolve_params(n, self.dim, self.args)
        check_params(n, self.dim, p)
        quantizer = f.IndexFlatIP(self.dim) if self.metric == "ip" else f.IndexFlatL2(self.dim)
        ivf = f.IndexIVFPQ(quantizer, self.dim, p["nlist"], p["m"], p["nbits"], self._faiss_metric())
        ivf.cp.niter = self.args["niter"]
        ivf.cp.seed = self.args["seed"]
        ivf.cp.spherical = self.metric == "ip"  # as for ivf: keep the centroids on the sphere
        ivf.nprobe = p["nprobe"]
        self.resolved = p
        if not p["opq"]:
            return ivf
        opq = f.OPQMatrix(self.dim, p["m"])
        opq.niter = self.args["niter"]  # FAISS's 50 alternations cost minutes at 256-d; 10 keep most of the gain
        opq.max_train_points = min(p["train_size"], opq.max_train_points)
        return f.IndexPreTransform(opq, ivf)

    def _train(self, source: VectorSource) -> None:
        n = len(source)
        if n == 0:
            return  # trained on the first extend
        size = min(n, self.resolved["train_size"])
        rng = np.random.default_rng(self.args["seed"])
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        t0 = time.perf_counter()
        self.index.train(source.take(rows))
        self.trained_on = n
        log.info("trained ivfpq (%s) on %d of %d vectors in %.1fs", self._describe(), size, n,
                 time.perf_counter() - t0)

    def extend(self, source: VectorSource, progress: bool = False) -> None:
        if self.index is None or not self.index.is_trained:
            self.build(source, progress)
        else:
            self._add_rows(source, self.ntotal, progress)

    def _ivf(self) -> Any:
        """The ``IndexIVFPQ`` (behind the rotation with ``opq``); valid while ``self.index`` lives."""
        if isinstance(self.index, self.faiss.IndexPreTransform):
            return self.faiss.downcast_index(self.index.index)
        return self.index

    def _describe(self) -> str:
        ivf = self._ivf()
        opq = isinstance(self.index, self.faiss.IndexPreTransform)
        return f"nlist={ivf.nlist} m={ivf.pq.M} nbits={ivf.pq.nbits} opq={opq}"

    def _nprobe(self, args: dict[str, Any]) -> int:
        return args.get("nprobe") or self.resolved.get("nprobe") or int(self._ivf().nprobe)

    def _params(self, args: dict[str, Any], k: int) -> Any:
        ivf = self.faiss.SearchParametersIVF(nprobe=self._nprobe(args))
        if isinstance(self.index, self.faiss.IndexPreTransform):
            return self.faiss.SearchParametersPreTransform(index_params=ivf)
        return ivf

    def search(self, queries: np.ndarray, k: int, source: VectorSource,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        refine = {**self.args, **params}["refine"]
        scores, ids = super().search(queries, k * refine, source, **params)
        if refine == 1:
            return scores, ids
        return refine_exact(queries, ids, source, k, self.metric, self.REFINE_BLOCK)

    def _faiss_type(self) -> type:
        return self.faiss.IndexPreTransform if self.args["opq"] else self.faiss.IndexIVFPQ

    def load(self, path: Path, count: int, info: dict[str, Any] | None = None) -> None:
        super().load(path, count, info)
        ivf = self._ivf()
        if not isinstance(ivf, self.faiss.IndexIVFPQ):
            raise DataError(f"{where(path)}holds a {type(ivf).__name__} behind the OPQ rotation, "
                            "expected an IndexIVFPQ")
        self.trained_on = int((info or {}).get("trained_on", count))
        self.resolved = {"nprobe": int((info or {}).get("nprobe", ivf.nprobe))}

    def info(self) -> dict[str, Any]:
        if self.index is None:
            return {}
        ivf = self._ivf()
        return {"nlist": int(ivf.nlist), "m": int(ivf.pq.M), "nbits": int(ivf.pq.nbits),
                "code_size": int(ivf.code_size), "nprobe": int(self._nprobe(self.args)),
                "trained_on": int(self.trained_on)}


def refine_exact(queries: np.ndarray, ids: np.ndarray, source: VectorSource, k: int, metric: str,
                 block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate rows ``ids`` (Q, C) exactly from ``source``; the top ``k``.

    Reads only the candidates' rows (from the memory map), ``block`` queries at a time.
    Returns ``(scores float32 (Q, k) descending, ids int64 (Q, k))``, ``-1`` / ``-inf`` padding.
    """
    nq, c = ids.shape
    out_s = np.full((nq, k), PAD_SCORE, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for q0 in range(0, nq, block):
        rows = ids[q0:q0 + block]  # (Qb, C)
        valid = rows >= 0
        flat = rows[valid]
        order = np.argsort(flat, kind="stable")  # read the memory map in file order
        vecs = np.empty((len(flat), source.dim), np.float32)
        vecs[order] = source.take(flat[order])
        cand = np.zeros(rows.shape + (source.dim,), np.float32)  # (Qb, C, d)
        cand[valid] = vecs
        q = queries[q0:q0 + block].astype(np.float32)  # (Qb, d)
        s = np.einsum("qd,qcd->qc", q, cand)  # (Qb, C)
        if metric == "l2":
            s = 2 * s - np.einsum("qcd,qcd->qc", cand, cand) - (q * q).sum(1, keepdims=True)
        s[~valid] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (Qb, <=k)
        kk = top.shape[1]
        out_s[q0:q0 + block, :kk] = np.take_along_axis(s, top, 1)
        out_i[q0:q0 + block, :kk] = np.where(np.take_along_axis(valid, top, 1),
                                             np.take_along_axis(rows, top, 1), -1)
    out_s[out_i < 0] = PAD_SCORE
    return out_s, out_i
