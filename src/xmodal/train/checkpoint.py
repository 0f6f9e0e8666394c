"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Run folder layout (read back by :func:`xmodal.models.run.load`)::

    RUN/config.yaml                    resolved config
    RUN/checkpoints/step_0000200/       model.safetensors, loss.safetensors, train.safetensors
                                       (optimizer + RNG), state.json, config.yaml, manifest.json
    RUN/checkpoints/latest.json        {"step": 200, "dir": "step_0000200"}  (written last)
    RUN/best/                          model.safetensors, state.json (step, metrics), config.yaml,
                                       manifest.json

Each checkpoint folder is written under a temporary name and renamed into place; its
``manifest.json`` (size and sha256 of every other file, written last) lets every reader
detect a damaged or modified file (:func:`xmodal.models.run.verify_checkpoint`).
Frozen towers (pretrained backbones rebuilt from their own weights) are not saved: the
model file holds only what training changed. No pickle anywhere.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import XmodalError, where
from ..models.run import (MANIFEST, check_shapes, checkpoint_manifest, load_weights_file, model_state, read_json,
                          read_tensors, verify_checkpoint)
from ..utils import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}/{key}"] = val.detach().cpu().contiguous().clone()
            else:
                plain.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in meta.get("plain_state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{k}"] = s
    return out


def _write_dir(final: Path, files: dict[str, Any]) -> None:
    """Write a checkpoint folder under a temporary name, then rename it into place."""
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is the checkpoint's own manifest, not a file to save")
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        path = tmp / name
        if name.endswith(".safetensors"):  # safetensors makes 0600 files: atomic_write gives the umask's mode
            atomic_write(path, lambda p, content=content: save_file(content, str(p)))
        elif name.endswith(".json"):
            atomic_write_text(path, json.dumps(content, indent=2) + "\n")
        else:
            atomic_write_text(path, content)
    write_manifest(tmp, files)  # last: size and sha256 of every file, read back from the disk
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, names: Any = None) -> Path:
    """Write ``folder/manifest.json``: size and sha256 of the files ``names`` (default: every file
    of the folder). Training calls it for each checkpoint it writes; call it after changing a
    checkpoint's file on purpose (e.g. editing ``best/config.yaml``) to record the new contents."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(checkpoint_manifest(folder, names), indent=2) + "\n", encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, loss: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict, config_yaml: str,
                    keep: int = 2) -> Path:
    """Save everything needed to resume exactly after ``step`` optimizer steps."""
    ckdir = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    rng = _rng_state()
    tensors = {**{f"rng/{k}": v for k, v in rng.items()}, **{f"optim/{k}": v for k, v in opt_tensors.items()}}
    _write_dir(ckdir / name, {
        "model.safetensors": model_state(model),
        "loss.safetensors": {k: v.detach().cpu().contiguous().clone() for k, v in loss.state_dict().items()},
        "train.safetensors": tensors,
        "state.json": {"step": step, "optimizer": opt_meta, **state},
        "config.yaml": config_yaml,
    })
    atomic_write_json(ckdir / "latest.json", {"step": step, "dir": name})
    steps = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return ckdir / name


def restore_checkpoint(path: Path, model: torch.nn.Module, loss: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> dict:
    """Load model, loss, optimizer and RNG states; return the JSON state (step, best, ...).

    The folder is checked against its manifest first; a damaged, missing or mismatched file is
    an :class:`XmodalError` naming it."""
    path = Path(path)
    verify_checkpoint(path)
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("optimizer"), dict):
        raise XmodalError(f"{where(path / 'state.json')}not a checkpoint state (no step / optimizer)")
    load_weights_file(model, path / "model.safetensors", verify=False)
    loss_tensors = read_tensors(path / "loss.safetensors")
    check_shapes(loss, loss_tensors, path / "loss.safetensors")
    try:
        loss.load_state_dict(loss_tensors)
    except RuntimeError as exc:
        raise XmodalError(f"{where(path / 'loss.safetensors')}does not match the loss ({_first_line(exc)})") from None
    extra = read_tensors(path / "train.safetensors")
    opt = {k[len("optim/"):]: v for k, v in extra.items() if k.startswith("optim/")}
    try:
        optimizer.load_state_dict(_unflatten_optimizer(opt, state["optimizer"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise XmodalError(f"{where(path / 'train.safetensors')}the optimizer state does not fit this model's "
                          f"optimizer ({_first_line(exc)})") from None
    _restore_rng(extra, path / "train.safetensors")
    return state


def _restore_rng(extra: dict[str, torch.Tensor], source: Path) -> None:
    if "rng/torch" not in extra:
        raise XmodalError(f"{where(source)}no random generator state (rng/torch)")
    try:
        torch.set_rng_state(extra["rng/torch"])
        if torch.cuda.is_available():
            cuda = [extra[k] for k in sorted(extra) if k.startswith("rng/cuda")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise XmodalError(f"{where(source)}bad random generator state ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def save_best(run_dir: Path, step: int, model: torch.nn.Module, metrics: dict, config_yaml: str,
              extra_files: dict[str, Any] | None = None) -> Path:
    final = Path(run_dir) / "best"
    _write_dir(final, {"model.safetensors": model_state(model),
                       "state.json": {"step": step, "metrics": metrics},
                       "config.yaml": config_yaml, **(extra_files or {})})
    return final
