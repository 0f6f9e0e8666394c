"""How feature extraction runs a frozen pixel tower: the backends behind ``extract --backend``.

========== ============================================================================
``eager``  the tower's own ``forward`` (the reference)
``torch``  the tower's :meth:`~xmodal.models.base.ImageTower.inference_graph` (for
           EfficientNet-lite: BatchNorm folded into the convolutions, ``channels_last``),
           run eagerly under ``torch.inference_mode``
``jit``    that graph traced and frozen with ``torch.jit`` (built on the first batch)
``onnxruntime``  that graph exported to ONNX once (kept under ``$XMODAL_CACHE/onnx/``, keyed by
           a digest of its weights and input shape) and run by ONNX Runtime on the CPU
``auto``   ``onnxruntime`` when it is installed (the ``onnx`` extra), the device is the CPU, the
           tower has a graph and there are at least :data:`AUTO_ONNX_MIN_IMAGES` images (the
           export costs seconds); else ``torch`` when the tower has a graph; else ``eager``
========== ============================================================================

Every backend gives the eager features within float rounding (cosine >= 0.999 per image is
tested; measured 0.99999+), and each is deterministic: the same backend, batch size and
thread count give bit-identical features. The backend is part of a feature folder's inputs, so
a resumed run never mixes two.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, XmodalError
from ..models.base import ImageTower
from ..utils import atomic_write, cache_dir

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "torch", "jit", "onnxruntime")
ONNX_OPSET = 17
#: ``auto`` exports to ONNX from this many images on: the export and session take 5-20 s, which
#: the faster model repays after a few hundred images at 160 px (docs/extract.md)
AUTO_ONNX_MIN_IMAGES = 256
_ONNX_FORMAT = "xmodal-onnx-1"

#: ``(pooled (b, D) float32, tokens (b, T, D) float32 or None, mask all true)`` of a pixel batch
Encoded = tuple[np.ndarray, "np.ndarray | None", bool]


def onnxruntime_available() -> bool:
    """True when both ``onnxruntime`` and ``onnx`` (which ``torch.onnx.export`` needs) import."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve_backend(name: str, tower: ImageTower, device: torch.device | str = "cpu",
                    num_images: int | None = None) -> str:
    """The backend ``name`` means for ``tower`` on ``device`` over ``num_images`` images (None:
    many), ``auto`` picked; checked."""
    if name not in BACKENDS:
        raise ConfigError(f"extraction backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    has_graph = tower.inference_graph() is not None
    cpu = torch.device(device).type == "cpu"
    if name == "auto":
        many = num_images is None or num_images >= AUTO_ONNX_MIN_IMAGES
        if has_graph and cpu and many and onnxruntime_available():
            return "onnxruntime"
        return "torch" if has_graph else "eager"
    if name in ("jit", "onnxruntime") and not has_graph:
        raise ConfigError(f"extraction backend {name!r} needs a traceable inference graph, which image tower "
                          f"{type(tower).__name__} does not provide; use backend eager")
    if name == "onnxruntime":
        if not cpu:
            raise ConfigError(f"extraction backend 'onnxruntime' runs on the CPU only, not on device {device}")
        if not onnxruntime_available():
            raise ConfigError("extraction backend 'onnxruntime' needs onnxruntime and onnx: "
                              "pip install 'xmodal[onnx]'")
    return name


class Engine:
    """Encodes uint8 pixel batches with one backend; the graph is built on the first batch."""

    def __init__(self, tower: ImageTower, backend: str, device: torch.device) -> None:
        self.tower, self.backend, self.device = tower, backend, device
        self._run: Callable[[torch.Tensor], Encoded] | None = None
        self._shape: tuple[int, ...] | None = None

    def __call__(self, pixels: torch.Tensor, grid: bool) -> Encoded:
        """``pixels`` ``(b, 3, H, W)`` -> pooled ``(b, D)``, tokens ``(b, T, D)`` (None without grid)."""
        if self._run is None:
            self._shape = tuple(pixels.shape[1:])
            self._run = self._build(pixels)
        elif tuple(pixels.shape[1:]) != self._shape and self.backend in ("jit", "onnxruntime"):
            raise XmodalError(f"backend {self.backend} was built for pixels {list(self._shape)}, got "
                              f"{list(pixels.shape[1:])}: the tower's preprocess must give one size")
        pooled, tokens, mask_ok = self._run(pixels)
        return pooled, (tokens if grid else None), mask_ok

    def _build(self, example: torch.Tensor) -> Callable[[torch.Tensor], Encoded]:
        if self.backend == "eager":
            return self._eager
        graph = self.tower.inference_graph()
        if graph is None:  # resolve_backend lets only graph towers get here
            raise XmodalError(f"image tower {type(self.tower).__name__} has no inference graph")
        graph = graph.to(self.device).eval()
        if self.backend == "torch":
            return _torch_runner(graph, self.device)
        if self.backend == "jit":
            return _torch_runner(_jit_graph(graph, example.to(self.device)), self.device)
        return _onnx_runner(graph, example)

    def _eager(self, pixels: torch.Tensor) -> Encoded:
        out = self.tower(pixels.to(self.device))
        mask_ok = out.mask is None or bool(out.mask.all())
        return out.pooled.float().cpu().numpy(), out.tokens.float().cpu().numpy(), mask_ok


def _torch_runner(graph: Callable, device: torch.device) -> Callable[[torch.Tensor], Encoded]:
    def run(pixels: torch.Tensor) -> Encoded:
        tokens, pooled = graph(pixels.to(device))
        return pooled.float().cpu().numpy(), tokens.float().cpu().numpy(), True
    return run


def _jit_graph(graph: nn.Module, example: torch.Tensor) -> Any:
    """``graph`` traced on ``example`` and frozen (constants folded, conv+BN fused by ``freeze``)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates torch.jit
        traced = torch.jit.trace(graph, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def graph_digest(graph: nn.Module, example: torch.Tensor) -> str:
    """sha256 over what an exported graph depends on: class, weights, input shape and dtype, torch."""
    h = hashlib.sha256(f"{_ONNX_FORMAT}|{ONNX_OPSET}|{torch.__version__}|{type(graph).__module__}."
                       f"{type(graph).__qualname__}|{list(example.shape[1:])}|{example.dtype}".encode())
    for key, val in sorted(graph.state_dict().items()):
        h.update(key.encode() + b"\0")
        h.update(val.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_onnx(graph: nn.Module, example: torch.Tensor) -> bytes:
    """``graph`` as an ONNX model with a dynamic batch axis (input ``pixels``, outputs ``tokens``, ``pooled``)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (example[:2].cpu(),), buf, input_names=["pixels"],
                          output_names=["tokens", "pooled"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}, "pooled": {0: "batch"}})
    return buf.getvalue()


def onnx_model_path(graph: nn.Module, example: torch.Tensor, root: Path | None = None) -> Path:
    """The cached ONNX file of ``graph`` (exported and written atomically on first use)."""
    root = Path(root) if root is not None else cache_dir() / "onnx"
    path = root / f"{graph_digest(graph, example)[:24]}.onnx"
    if not path.is_file():
        log.info("exporting the image tower to ONNX: %s", path)
        data = export_onnx(graph, example)
        atomic_write(path, lambda p: p.write_bytes(data))
    return path


def _onnx_runner(graph: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], Encoded]:
    import onnxruntime as ort

    path = onnx_model_path(graph, example)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same budget torch would use
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        with contextlib.suppress(OSError):
            path.unlink()  # a damaged cache file: the next run exports again
        raise XmodalError(f"{path}: ONNX Runtime cannot load the exported tower ({exc}); "
                          "run again to re-export, or use --backend torch") from None
    dtype = {torch.uint8: np.uint8, torch.float32: np.float32}.get(example.dtype)
    if dtype is None:
        raise XmodalError(f"backend onnxruntime takes uint8 or float32 pixels, got {example.dtype}")

    def run(pixels: torch.Tensor) -> Encoded:
        feed = np.ascontiguousarray(pixels.cpu().numpy(), dtype=dtype)
        tokens, pooled = session.run(["tokens", "pooled"], {"pixels": feed})
        return np.asarray(pooled, np.float32), np.asarray(tokens, np.float32), True
    return run


__all__ = ["AUTO_ONNX_MIN_IMAGES", "BACKENDS", "Engine", "resolve_backend", "onnxruntime_available", "export_onnx", "onnx_model_path",
           "graph_digest"]
