"""Small C kernels compiled at first use and called through :mod:`ctypes`.

Some loops (ADAPT's Fovea pass) are faster written by hand than through ``torch.compile``:
one exp per element with a cheaper (still float32-exact to ~2e-7) exponential, no
``(pairs, D)`` temporaries, and gradients that skip pairs whose loss gradient is zero. Their
C sources ship in ``xmodal/models/kernels/``; :func:`load` compiles one with the system C
compiler (``$CC``, else ``cc``; the one ``torch.compile`` needs on CPU anyway) into
``$XMODAL_CACHE/kernels/``, keyed by the source, the flags, the compiler and this CPU, so a
cache shared between machines never hands one CPU another's ``-march=native`` code. The
library is written to a temporary name and renamed, so concurrent processes never load a
half-written file. ``XMODAL_NATIVE=0`` turns native kernels off (callers fall back to their
compiled or eager torch paths); a missing or failing compiler does the same, with a warning.

:func:`parallel_for` splits a range over threads: ctypes releases the GIL during a foreign
call, so each thread runs its slice of the C loop on its own core.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import XmodalError
from ..utils import cache_dir

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
#: IEEE arithmetic as written (no ``-ffast-math``: reassociation would undo the exponential's
#: exact range reduction); reductions are vectorised where the source says so (``omp simd``)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-std=c11",
         "-shared", "-fPIC")
#: 512-bit vectors where the CPU has them (GCC and clang default to 256 on AVX-512 parts)
WIDE_FLAGS = ("-mprefer-vector-width=512",)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}
_pools: dict[int, ThreadPoolExecutor] = {}


def enabled() -> bool:
    """Whether native kernels may be used (``XMODAL_NATIVE=0`` turns them off)."""
    return os.environ.get("XMODAL_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300)


def _build(name: str, source: Path, cc: str) -> Path:
    """Compile ``source`` into the cache (once per source, flags, compiler and CPU)."""
    version = _run([cc, "--version"]).stdout.splitlines()[:1]
    flags = list(FLAGS)
    probe = _run([cc, *WIDE_FLAGS, "-x", "c", "-fsyntax-only", "-"]) if platform.machine() in ("x86_64", "AMD64") else None
    if probe is not None and probe.returncode == 0:
        flags += WIDE_FLAGS
    key = hashlib.sha256("\0".join([source.read_text(), *flags, *version, _cpu_id()]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "kernels"
    lib = out_dir / f"{name}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = _run([cc, *flags, "-o", tmp, str(source), "-lm"])
        if res.returncode != 0:
            raise XmodalError(f"{source}: {cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process either sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``kernels/<name>.c``, or None where it cannot be had
    (native kernels off, no compiler, compilation failed: see :func:`error`)."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib: ctypes.CDLL | None = None
        try:
            if not enabled():
                raise XmodalError("native kernels are turned off (XMODAL_NATIVE=0)")
            cc = _compiler()
            if cc is None:
                raise XmodalError("no C compiler found (set CC, or install gcc)")
            lib = ctypes.CDLL(str(_build(name, KERNEL_DIR / f"{name}.c", cc)))
        except (OSError, subprocess.SubprocessError, XmodalError) as exc:
            _errors[name] = str(exc)
            if enabled():
                log.warning("native %s kernels unavailable (%s); using torch kernels", name, exc)
        _loaded[name] = lib
        return lib


def error(name: str) -> str | None:
    """Why :func:`load` returned None for ``name`` (None if it did not, or was not called)."""
    return _errors.get(name)


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A contiguous CPU tensor's data pointer for a C call (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(None)
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("native kernels take contiguous CPU tensors")
    return ctypes.c_void_p(t.data_ptr())


def split_work(weights: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[i0, i1)`` ranges over items with about equal total ``weights`` each."""
    n = int(weights.numel())
    parts = max(1, min(parts, n))
    if parts == 1:
        return [(0, n)]
    cum = torch.cumsum(weights.to(torch.float64), 0)
    targets = cum[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = torch.searchsorted(cum, targets).add_(1).clamp_(1, n).tolist()
    bounds = sorted(set([0, *cuts, n]))
    return list(zip(bounds[:-1], bounds[1:]))


def parallel_for(fn: Callable[[int, int, int], None], ranges: Sequence[tuple[int, int]]) -> None:
    """``fn(i0, i1, part)`` for each range, on as many threads as there are ranges."""
    if len(ranges) == 1:
        fn(*ranges[0], 0)
        return
    with _lock:
        pool = _pools.get(len(ranges))
        if pool is None:
            pool = _pools[len(ranges)] = ThreadPoolExecutor(len(ranges), thread_name_prefix="xmodal-native")
    for f in [pool.submit(fn, i0, i1, part) for part, (i0, i1) in enumerate(ranges)]:
        f.result()
