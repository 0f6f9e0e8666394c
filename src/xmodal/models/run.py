"""A trained run as a value: :class:`Run` and :func:`load`, beside the models they rebuild.

Run folder layout (written by :mod:`xmodal.train.checkpoint`)::

    RUN/config.yaml                    resolved config
    RUN/checkpoints/step_0000200/       model.safetensors, optim.safetensors, state.json
    RUN/checkpoints/latest.json        {"step": 200, "dir": "step_0000200"}  (written last)
    RUN/best/                          model.safetensors, state.json (step, metrics), config.yaml

A model is rebuilt from its resolved config (:func:`create_model`), then its saved weights
are loaded (safetensors, never pickle). Frozen towers rebuilt from their own pretrained
files are left out of the weights file (:func:`skipped_prefixes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ModelConfig, load_config
from ..errors import ConfigError, XmodalError, where
from .base import MODELS, EmbeddingScorer, AttachedRun, ImageTower, PairScorer, Scorer, TextTower

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
    """Load ``tensors`` into ``model``; every tensor a checkpoint must hold has to be there."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    skip = skipped_prefixes(model)
    missing = [k for k in missing if not (skip and k.startswith(skip))]
    if missing or unexpected:
        raise XmodalError(f"{source}: weights do not match the model "
                          f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def load_weights_file(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    load_weights(model, load_file(str(path), device="cpu"), path)


# ------------------------------------------------------------------------------------------
# run folders
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a training run, or None before the first."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError) as exc:
        raise XmodalError(f"{pointer}: corrupt checkpoint pointer ({exc})") from None
    path = pointer.parent / name
    if not (path / "state.json").exists():
        raise XmodalError(f"{pointer}: points to {path}, which is missing or incomplete")
    return path


def checkpoint_dir(run_dir: Path, checkpoint: str = "best") -> Path:
    """The folder of ``checkpoint`` (``best``, ``latest`` or a path) in a run folder."""
    run_dir = Path(run_dir)
    if checkpoint == "best":
        path = run_dir / "best"
        if not (path / "model.safetensors").exists():
            raise XmodalError(f"{where(run_dir)}no best checkpoint (is this an xmodal run folder?)")
        return path
    if checkpoint == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise XmodalError(f"{where(run_dir)}no checkpoint yet")
        return path
    return Path(checkpoint)


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
    if run_dir.suffix in (".yaml", ".yml") and run_dir.is_file():
        cfg = load_config(run_dir)
        model = create_model(cfg.model)
        if model.needs_training():
            raise XmodalError(f"{run_dir}: this config's model must be trained first "
                              f"(xmodal train {run_dir} --out RUN), then pass the run folder")
        return Run(model.to(device).eval(), cfg, run_dir)
    ck = checkpoint_dir(run_dir, checkpoint)
    cfg = load_config(ck / "config.yaml")
    model = create_model(cfg.model)
    load_weights_file(model, ck / "model.safetensors")
    return Run(model.to(device).eval(), cfg, run_dir, step_of(ck), ck)


__all__ = ["KINDS", "Run", "as_model", "checkpoint_dir", "create_model", "latest_checkpoint", "list_models", "load",
           "load_weights", "load_weights_file", "model_state", "scorer_kind", "skipped_prefixes"]
