"""A trained run as a value: :class:`Run` and :func:`load`, beside the models they rebuild.

Run folder layout (written by :mod:`xmodal.train.checkpoint`)::

    RUN/config.yaml                    resolved config
    RUN/checkpoints/step_0000200/       model.safetensors, loss.safetensors, train.safetensors,
                                       state.json, config.yaml, manifest.json
    RUN/checkpoints/latest.json        {"step": 200, "dir": "step_0000200"}  (written last)
    RUN/best/                          model.safetensors, state.json (step, metrics), config.yaml,
                                       manifest.json

A model is rebuilt from its resolved config (:func:`create_model`), then its saved weights
are loaded (safetensors, never pickle). Frozen towers rebuilt from their own pretrained
files are left out of the weights file (:func:`skipped_prefixes`).

Every checkpoint folder holds ``manifest.json``: the size and sha256 of each of its files.
Whatever reads a checkpoint (:func:`checkpoint_dir`, :func:`latest_checkpoint`,
:func:`load_weights_file`, resuming) checks it first (:func:`verify_checkpoint`) and names a
damaged file; folders written before manifests existed are read unchecked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..config import Config, ModelConfig, load_config
from ..errors import ConfigError, XmodalError, where
from .base import MODELS, EmbeddingScorer, AttachedRun, ImageTower, PairScorer, Scorer, TextTower

log = logging.getLogger(__name__)

#: the two kinds of scorer a run can hold (see :mod:`xmodal.models.base`)
KINDS = ("embedding", "pair")


def create_model(cfg: ModelConfig | None = None, **overrides: Any) -> nn.Module:
    """Build a model from a ``ModelConfig`` (or the default one with dotted ``overrides``)."""
    if cfg is None:
        cfg = load_config(None, [f"model.{k}={v}" for k, v in overrides.items()]).model
    elif not isinstance(cfg, ModelConfig):
        raise TypeError(f"create_model expects a ModelConfig, got {type(cfg).__name__}")
    return MODELS.create(cfg.type, cfg)


def list_models() -> list[str]:
    """The registered model types (``model.type`` in a config)."""
    return MODELS.names()


def scorer_kind(model: nn.Module) -> str:
    """``"embedding"`` when scores are dot products of vectors (indexable), else ``"pair"``."""
    if isinstance(model, EmbeddingScorer):
        return "embedding"
    if isinstance(model, PairScorer):
        return "pair"
    raise ConfigError(f"{type(model).__name__} is neither an EmbeddingScorer nor a PairScorer")


@dataclass(frozen=True)
class Run:
    """A model with the config that built it, where it came from and which checkpoint step.

    ``path`` is the run folder (or, for a config whose model needs no training, the YAML
    file); ``checkpoint`` the folder the weights were read from (None for such configs).
    """

    model: nn.Module
    config: Config
    path: Path
    step: int | None = None
    checkpoint: Path | None = None

    @property
    def kind(self) -> str:
        return scorer_kind(self.model)

    @property
    def name(self) -> str:
        """A short label for people: the run folder's name and the model class."""
        return f"{self.path.name} ({type(self.model).__name__})"


def as_model(obj: Any) -> nn.Module:
    """The model of a :class:`Run`, or ``obj`` itself (a model built in code)."""
    return obj.model if isinstance(obj, Run) else obj


# ------------------------------------------------------------------------------------------
# weights
def skipped_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes a checkpoint leaves out: frozen towers whose every weight comes from
    the files their config names. A frozen tower with random parts (a frozen BiGRU, a new
    projection) is saved: rebuilding it would give other weights."""
    out = []
    for prefix in model.frozen_prefixes() if isinstance(model, Scorer) else []:
        try:
            sub = model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            continue
        if isinstance(sub, (ImageTower, TextTower, AttachedRun)) and sub.rebuilt_from_source():
            out.append(prefix)
    return tuple(out)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for ``model`` (frozen pretrained towers left out)."""
    skip = skipped_prefixes(model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if not (skip and k.startswith(skip))}


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``tensors`` into ``model``; every tensor a checkpoint must hold has to be there, each
    with the shape the model has (else an :class:`XmodalError` naming ``source`` and the tensor)."""
    check_shapes(model, tensors, source)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    skip = skipped_prefixes(model)
    missing = [k for k in missing if not (skip and k.startswith(skip))]
    if missing or unexpected:
        raise XmodalError(f"{source}: weights do not match the model "
                          f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def check_shapes(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every tensor of ``tensors`` that ``module`` has must have its shape (names the first that
    does not, with both shapes, and counts the others)."""
    wrong = [(name, tuple(tensors[name].shape), tuple(want.shape)) for name, want in module.state_dict().items()
             if name in tensors and tuple(tensors[name].shape) != tuple(want.shape)]
    if wrong:
        name, found, expected = wrong[0]
        more = f"; {len(wrong) - 1} more tensors differ" if len(wrong) > 1 else ""
        raise XmodalError(f"{where(source)}tensor {name!r} has shape {found}, the model expects {expected}"
                          f"{more} (weights saved with another model config?)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or an :class:`XmodalError` naming a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise XmodalError(f"{where(path)}missing (the checkpoint is incomplete)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise XmodalError(f"{where(path)}not a readable safetensors file ({exc}); it is damaged or "
                          "incomplete: restore it from a copy or retrain") from None


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or an :class:`XmodalError` naming a missing or corrupt one."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XmodalError(f"{where(path)}missing (the checkpoint is incomplete)") from None
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise XmodalError(f"{where(path)}not valid JSON ({exc})") from None


def load_weights_file(model: nn.Module, path: Path, verify: bool = True) -> None:
    """Load a checkpoint's weights file into ``model`` (checked against its folder's manifest)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path.parent, names=[path.name])
    load_weights(model, read_tensors(path), path)


# ------------------------------------------------------------------------------------------
# checkpoint manifests
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "xmodal-checkpoint"
MANIFEST_VERSION = 1
#: sha256 digests of files checked in this process, by (device, inode, size, mtime, ctime)
_DIGESTS: dict[tuple[int, ...], str] = {}
#: a file changed this recently may change again within the clock's resolution: not remembered
_SETTLED_S = 2.0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (remembered while the file's size, times and inode stay the same)."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time() - max(st.st_mtime, st.st_ctime) > _SETTLED_S:
        _DIGESTS[key] = digest
    return digest


def file_record(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as a manifest lists it."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def checkpoint_manifest(folder: Path, names: Iterable[str]) -> dict[str, Any]:
    """The manifest of the files ``names`` in ``folder``."""
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "files": {name: file_record(Path(folder) / name) for name in sorted(names)}}


def read_checkpoint_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` checked for shape (None when the folder predates manifests)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise XmodalError(f"{where(path, None, 'format')}not an xmodal checkpoint manifest")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > MANIFEST_VERSION:
        raise XmodalError(f"{where(path, None, 'format_version')}{version!r} is not supported (this xmodal "
                          f"reads up to {MANIFEST_VERSION}); upgrade xmodal")
    files = m.get("files")
    if not isinstance(files, dict):
        raise XmodalError(f"{where(path, None, 'files')}missing or not a mapping")
    for name, rec in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise XmodalError(f"{where(path, None, 'files')}{name!r} is not a file of this folder")
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec["size"], bool)
                and isinstance(rec.get("sha256"), str)):
            raise XmodalError(f"{where(path, None, 'files')}no size/sha256 record for {name!r}")
    return m


def verify_checkpoint(folder: Path, names: Iterable[str] | None = None) -> None:
    """Check the files of a checkpoint folder (or only ``names``) against its manifest: each
    listed file exists, with the recorded size and sha256. A folder without a manifest (written
    before manifests existed) passes unchecked."""
    folder = Path(folder)
    manifest = read_checkpoint_manifest(folder)
    if manifest is None:
        log.debug("%s: no %s (written before checkpoints had one): not verified", folder, MANIFEST)
        return
    wanted = None if names is None else set(names)
    for name, rec in manifest["files"].items():
        if wanted is None or name in wanted:
            _verify_file(folder / name, rec)


def _verify_file(path: Path, rec: dict[str, Any]) -> None:
    if not path.is_file():
        raise XmodalError(f"{where(path)}missing (listed in {MANIFEST}); the checkpoint is incomplete: "
                          "restore it from a copy or retrain")
    size = path.stat().st_size
    if size != rec["size"]:
        raise XmodalError(f"{where(path)}size mismatch: {size} bytes, {MANIFEST} records {rec['size']} "
                          "(truncated or modified since it was written); restore it from a copy or retrain")
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        raise XmodalError(f"{where(path)}checksum mismatch (damaged or modified since it was written); "
                          f"sha256 {digest[:16]}..., {MANIFEST} records {rec['sha256'][:16]}...: "
                          "restore it from a copy or retrain")


# ------------------------------------------------------------------------------------------
# run folders
def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run (a ``best/`` checkpoint or ``checkpoints/latest.json``)."""
    path = Path(path)
    return (path / "best").is_dir() or (path / "checkpoints" / "latest.json").is_file()


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint folder of a training run (checked against its manifest
    unless ``verify`` is false), or None before the first."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise XmodalError(f"{pointer}: corrupt checkpoint pointer ({exc})") from None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise XmodalError(f"{pointer}: corrupt checkpoint pointer (dir {name!r})")
    path = pointer.parent / name
    if not (path / "state.json").exists():
        raise XmodalError(f"{pointer}: points to {path}, which is missing or incomplete")
    if verify:
        verify_checkpoint(path)
    return path


def check_run_folder(run_dir: Path) -> None:
    """An :class:`XmodalError` unless ``run_dir`` is a run folder: it names a missing folder, or the
    run folder(s) inside a folder that is not one (``xmodal demo``'s output holds its run in ``run/``)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise XmodalError(f"{where(run_dir)}no such folder")
    if not run_dir.is_dir():
        raise XmodalError(f"{where(run_dir)}not a folder (expected a run folder written by xmodal train)")
    if is_run_folder(run_dir):
        return
    try:
        inner = sorted(p for p in run_dir.iterdir() if p.is_dir() and is_run_folder(p))
    except OSError:
        inner = []
    if len(inner) == 1:
        raise XmodalError(f"{where(run_dir)}not a run folder; the run is {inner[0]} (pass that folder)")
    if inner:
        shown = ", ".join(map(str, inner[:5])) + (f" and {len(inner) - 5} more" if len(inner) > 5 else "")
        raise XmodalError(f"{where(run_dir)}not a run folder; it holds several: {shown} (pass one of them)")
    raise XmodalError(f"{where(run_dir)}not an xmodal run folder (no best/ or checkpoints/latest.json)")


def checkpoint_dir(run_dir: Path, checkpoint: str = "best") -> Path:
    """The folder of ``checkpoint`` (``best``, ``latest`` or a checkpoint folder, as given or
    inside the run folder) in a run folder, checked against its manifest."""
    run_dir = Path(run_dir)
    if checkpoint in ("best", "latest"):
        check_run_folder(run_dir)
    if checkpoint == "best":
        path = run_dir / "best"
        if not path.is_dir():
            raise XmodalError(f"{where(run_dir)}no best checkpoint yet (written at the first evaluation); "
                              "load the last one with checkpoint latest (--checkpoint latest)")
    elif checkpoint == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise XmodalError(f"{where(run_dir)}no checkpoint yet")
    else:
        path = Path(checkpoint)
        if not path.exists() and (run_dir / checkpoint).exists():
            path = run_dir / checkpoint
        if not path.is_dir():
            raise XmodalError(f"{where(path)}{'not a folder' if path.exists() else 'no such folder'} "
                              "(--checkpoint: best, latest or a checkpoint folder)")
    verify_checkpoint(path)
    return path


def step_of(ck: Path) -> int | None:
    state = ck / "state.json"
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(run_dir: Any, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Rebuild the model of a run folder (its resolved config, then its saved weights).

    A YAML config whose model has nothing to train (an ensemble of finished runs) loads too.
    """
    run_dir = Path(run_dir)
    if run_dir.suffix in (".yaml", ".yml") and not run_dir.exists():
        raise XmodalError(f"{where(run_dir)}no such file")
    if run_dir.suffix in (".yaml", ".yml") and run_dir.is_file():
        cfg = load_config(run_dir)
        model = create_model(cfg.model)
        if model.needs_training():
            raise XmodalError(f"{run_dir}: this config's model must be trained first "
                              f"(xmodal train {run_dir} --out RUN), then pass the run folder")
        return Run(model.to(device).eval(), cfg, run_dir)
    ck = checkpoint_dir(run_dir, checkpoint)  # checked against its manifest
    cfg = load_config(ck / "config.yaml")
    model = create_model(cfg.model)
    load_weights_file(model, ck / "model.safetensors", verify=False)
    return Run(model.to(device).eval(), cfg, run_dir, step_of(ck), ck)


__all__ = ["KINDS", "MANIFEST", "Run", "as_model", "check_run_folder", "check_shapes", "checkpoint_dir",
           "checkpoint_manifest", "create_model", "file_record", "is_run_folder", "latest_checkpoint", "list_models",
           "load", "load_weights", "load_weights_file", "model_state", "read_checkpoint_manifest", "read_json",
           "read_tensors", "scorer_kind", "sha256_file", "skipped_prefixes", "verify_checkpoint"]
