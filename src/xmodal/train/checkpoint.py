"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Run folder layout (read back by :func:`xmodal.models.run.load`)::

    RUN/config.yaml                    resolved config
    RUN/checkpoints/step_0000200/       model.safetensors, optim.safetensors, state.json
    RUN/checkpoints/latest.json        {"step": 200, "dir": "step_0000200"}  (written last)
    RUN/best/                          model.safetensors, state.json (step, metrics), config.yaml

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
from safetensors.torch import load_file, save_file

from ..models.run import load_weights_file, model_state
from ..utils import atomic_write_json

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
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        path = tmp / name
        if name.endswith(".safetensors"):
            save_file(content, str(path))
        elif name.endswith(".json"):
            path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        else:
            path.write_text(content, encoding="utf-8")
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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
    """Load model, loss, optimizer and RNG states; return the JSON state (step, best, ...)."""
    state = json.loads((path / "state.json").read_text())
    load_weights_file(model, path / "model.safetensors")
    loss.load_state_dict(load_file(str(path / "loss.safetensors")))
    extra = load_file(str(path / "train.safetensors"))
    opt = {k[len("optim/"):]: v for k, v in extra.items() if k.startswith("optim/")}
    optimizer.load_state_dict(_unflatten_optimizer(opt, state["optimizer"]))
    torch.set_rng_state(extra["rng/torch"])
    if torch.cuda.is_available():
        cuda = [extra[k] for k in sorted(extra) if k.startswith("rng/cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state


def save_best(run_dir: Path, step: int, model: torch.nn.Module, metrics: dict, config_yaml: str,
              extra_files: dict[str, Any] | None = None) -> Path:
    final = Path(run_dir) / "best"
    _write_dir(final, {"model.safetensors": model_state(model),
                       "state.json": {"step": step, "metrics": metrics},
                       "config.yaml": config_yaml, **(extra_files or {})})
    return final
