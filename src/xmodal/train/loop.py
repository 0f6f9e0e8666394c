"""The training loop: one for every method.

It first reads and checks everything a run needs that is cheap to check (the trainer's choices
in the config, every split it reads, their image files, ``train.batch_size`` against the
training set: :func:`check_train_config`, :func:`check_data`), then builds the model, the loss
and the task, prepares the train and validation splits (caching frozen towers), and only then
creates the run folder (a run that fails its checks or its setup leaves nothing behind). It runs
optimizer steps with warmup + cosine or step schedules, gradient clipping, AMP on CUDA, periodic
evaluation with the streaming engine, best checkpoint by validation rsum, early stopping, and
exact resume.

Launched by ``torchrun``, every process runs :func:`train`: each encodes its slice of the
global batch, features are gathered so the loss sees the global batch, DDP averages the
gradients, and rank 0 alone evaluates, logs and writes the run folder
(:mod:`xmodal.distributed`). ``train.batch_size`` is the global batch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import config as C
from ..errors import ConfigError, DataError, XmodalError
from ..utils import atomic_write_json, atomic_write_text, seed_everything
from ..models.run import latest_checkpoint
from .checkpoint import restore_checkpoint, save_best, save_checkpoint
from ..data.inputs import Batch, BatchOrder, positive_mask
from ..distributed import DistEnv, barrier, broadcast_flag, in_turns, session
from .ddp import GatheringModel, ShardedBatchOrder, data_parallel, step_seed
from .tasks import build_task

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("none", "bf16", "fp16")


def check_train_config(cfg: C.Config) -> None:
    """The trainer's own choices in ``cfg`` (optimizer, schedule, AMP) and every numeric field's
    range (also for a config built in Python and changed after loading), checked before anything is loaded."""
    C.validate(cfg)
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {cfg.optim.name!r}; choose adam, adamw, adamax or sgd")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: unknown schedule {cfg.optim.schedule!r}; choose cosine, step or constant")
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp: expected none, bf16 or fp16, got {cfg.train.amp!r}")


def check_data(cfg: C.Config, world_size: int = 1) -> tuple[Any, Any, str | None]:
    """Read every split a run trains on, before any feature extraction or model loading:
    ``(train dataset, val dataset, note)``.

    Reading checks the data path, the format's files, columns and split names; then the image
    files are looked for (all missing = a wrong path) and ``train.batch_size`` is fitted to the
    training set: larger than it, it is lowered to it (to a multiple of ``world_size`` under
    torchrun) and ``note`` says so; ``cfg`` is changed in place, so the saved config holds the
    batch size used and ``--resume`` (which fits it the same way) compares equal.
    """
    from ..data.pipeline import check_image_files

    d = cfg.data
    train_ds = _read_split(cfg, "train_split", d.train_lang, training=True)
    val_ds = _read_split(cfg, "val_split", d.eval_lang)
    for ds in (train_ds, val_ds):
        check_image_files(ds)
    note = fit_batch_size(cfg, train_ds, world_size)
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch; it must divide evenly "
                          f"among {world_size} processes")
    return train_ds, val_ds, note


def _read_split(cfg: C.Config, key: str, lang: str, training: bool = False) -> Any:
    """The split ``cfg.data.<key>`` names; a split the data lacks says which config key named it."""
    from ..data.pipeline import load_split

    split = getattr(cfg.data, key)
    try:
        return load_split(cfg, split, lang, training=training)
    except DataError as exc:
        if repr(split) not in str(exc):
            raise
        raise DataError(f"{exc} (the run reads split data.{key}={split!r}; choose another with "
                        f"data.{key}=NAME)") from None


def fit_batch_size(cfg: C.Config, train_ds: Any, world_size: int = 1) -> str | None:
    """Lower ``cfg.train.batch_size`` to the training set's size when it is larger (in place);
    the one-line note saying so, else None."""
    from ..data.pipeline import training_samples

    n, unit = training_samples(cfg, train_ds)
    asked = cfg.train.batch_size
    if n < max(world_size, 1):
        raise DataError(f"training split {train_ds.name}/{train_ds.split} has {n} {unit} with an image: "
                        f"too few to train" + (f" on {world_size} processes" if world_size > 1 else ""))
    if asked <= n:
        return None
    cfg.train.batch_size = n - n % world_size
    procs = f" (a multiple of the {world_size} processes)" if world_size > 1 else ""
    return (f"note: train.batch_size={asked} is more than the training split's {n} {unit}; "
            f"training with train.batch_size={cfg.train.batch_size}{procs}")


def lr_at(step: int, cfg: C.OptimConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((step - cfg.warmup_steps) // max(cfg.step_size, 1))
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r}; choose cosine, step or constant")


def make_optimizer(params: list[torch.nn.Parameter], cfg: C.OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    betas = tuple(float(b) for b in cfg.betas)
    if cfg.name == "adam":
        return torch.optim.Adam(params, betas=betas, **kw)
    if cfg.name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(params, betas=betas, fused=fused or None, **kw)
    if cfg.name == "adamax":
        return torch.optim.Adamax(params, betas=betas, **kw)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, **kw)
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}; choose adam, adamw, adamax or sgd")


def param_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: C.Config) -> list:
    """Optimiser groups: ``params`` as one group, unless the model has a ``param_groups(cfg)``
    hook returning ``[{"params": [...], "lr_scale": s}, ...]`` (each group's scheduled rate is
    multiplied by its ``lr_scale``); trainable parameters the hook leaves out keep scale 1."""
    declared = model.param_groups(cfg)
    if declared is None:
        return params
    trainable = {id(p) for p in params}
    seen: set[int] = set()
    groups = []
    for g in declared:
        ps = [p for p in g["params"] if id(p) in trainable and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            groups.append({**g, "params": ps, "lr_scale": float(g.get("lr_scale", 1.0))})
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr_scale": 1.0})
    return groups


def prepare_config(cfg: C.Config, train_ds: Any = None) -> None:
    """Fill what a config derives from its data, deterministically, before it is saved.

    A BiGRU text tower without a vocabulary gets a word-level tokenizer trained on the
    training captions; its JSON goes into the config so the run can be rebuilt anywhere.
    ``train_ds``: the training split as :func:`check_data` read it (else it is read here).
    """
    for tcfg in (cfg.model.text,):
        if tcfg.name == "bigru" and not (tcfg.args.get("tokenizer_json") or tcfg.args.get("tokenizer_path")):
            from ..models.text.bigru import train_tokenizer
            from ..data.pipeline import load_split

            ds = train_ds if train_ds is not None else \
                load_split(cfg, cfg.data.train_split, cfg.data.train_lang, training=True)
            tcfg.args["tokenizer_json"] = train_tokenizer(ds.captions, min_freq=int(tcfg.args.pop("min_freq", 1)))


class MetricLog:
    """JSONL metric log (always) + TensorBoard (when installed and enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed; logging to %s only", self.path)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def config_changes(saved_path: Path, cfg: C.Config) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's saved config and ``cfg``.

    The saved file is parsed with today's defaults, so fields added to the config schema after
    the run was saved (at their defaults) do not block ``--resume``.
    """
    saved = C.to_dict(C.load_config(saved_path))  # its errors name the file and line
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        elif a != b:
            out.append(where or "(config)")

    walk(saved, C.to_dict(cfg), "")
    return out


def train(cfg: C.Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          console: Any = None) -> dict:
    """Train ``cfg`` into ``run_dir``; returns a summary (best step, best metrics, paths).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; it joins the process
    group for the duration of the run. A run may resume with another number of processes.
    """
    with session(cfg.train.device) as (env, device):
        return _train(cfg, Path(run_dir), env, device, resume=resume, progress=progress, console=console)


def _train(cfg: C.Config, run_dir: Path, env: DistEnv, device: torch.device, *, resume: bool,
           progress: bool, console: Any) -> dict:
    """Check a run's inputs, set it up (model, task, splits, optimizer, resumed state), create its
    folder, train it and write its summary."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not env.is_main:  # one process speaks for the run
        console, progress = Console(stderr=True, quiet=True), False
    check_train_config(cfg)
    train_ds, val_ds, note = check_data(cfg, env.world_size)  # before any model loading or extraction
    if note:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    prepare_config(cfg, train_ds)
    config_yaml = yaml.safe_dump(C.to_dict(cfg), sort_keys=False)
    ckpt = _checkpoint_to_resume(cfg, run_dir, resume)
    model, loss, task = _build(cfg, env, run_dir)

    t0 = time.perf_counter()
    train_split, val_split = _prepare_splits(cfg, model, task, env, progress, (train_ds, val_ds))
    prep_seconds = time.perf_counter() - t0
    console.print(f"[bold]train[/] {train_split.dataset.summary()}")
    if val_split is not None:
        console.print(f"[bold]val[/]   {val_split.dataset.summary()}")
    if env.enabled:
        console.print(f"{env.world_size} processes, global batch {cfg.train.batch_size} "
                      f"({cfg.train.batch_size // max(env.world_size, 1)} per process), device {device}")

    task.to(device)
    params = [p for p in task.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    optimizer = make_optimizer(param_groups(model, params, cfg), cfg.optim, device)
    order = ShardedBatchOrder(BatchOrder(train_split.dataset.gt, cfg.train.batch_size, cfg.train.seed), env)

    state: dict[str, Any] = {"best_rsum": -1.0, "best_step": -1, "best_metrics": None, "bad_evals": 0,
                             "elapsed": 0.0}
    start = 0
    if resume and ckpt is not None:
        state.update(restore_checkpoint(ckpt, model, loss, optimizer))
        start = int(state["step"])
        console.print(f"resuming {run_dir} from step {start}")
    state.pop("optimizer", None)
    state["world_size"] = env.world_size
    scaler, use_amp, amp_dtype = _amp_setup(cfg, device, state, run_dir)
    if env.is_main:  # everything is checked and set up: only now the run folder is written
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    metric_log = MetricLog(run_dir, cfg.train.tensorboard) if env.is_main else None

    run = _Run(cfg, run_dir, env, device, console, config_yaml, model, loss, task, params, optimizer, order,
               train_split, val_split, state, metric_log, scaler, use_amp, amp_dtype)
    step, stopped_early = _loop(run, start, progress)
    summary = {"run_dir": str(run_dir), "steps": step, "best_step": state["best_step"],
               "best_val": state["best_metrics"], "stopped_early": stopped_early,
               "train_seconds": state["elapsed"], "prepare_seconds": prep_seconds, "world_size": env.world_size}
    if metric_log is not None:
        metric_log.close()
        atomic_write_json(run_dir / "summary.json", summary)
    barrier(env)  # the others leave the group only once rank 0 has written the run
    return summary


def _build(cfg: C.Config, env: DistEnv, run_dir: Path) -> tuple[Any, Any, Any]:
    """``(model, loss, task)`` of ``cfg``, seeded; the model's own preparation done."""
    from ..losses import create_loss
    from ..models import create_model

    seed_everything(cfg.train.seed)
    model = create_model(cfg.model)
    if not model.needs_training():
        raise ConfigError(f"{type(model).__name__} has nothing to train (an ensemble of finished runs): "
                          "evaluate the config directly, xmodal eval CONFIG.yaml")
    loss = create_loss(cfg.loss.name, **cfg.loss.args)
    # several processes: the task sees the global batch's features (gathered), see distributed.py
    task = build_task(GatheringModel(model, env) if env.enabled else model, loss, model.task_name())
    model.prepare_training(cfg, run_dir)
    return model, loss, task


def _checkpoint_to_resume(cfg: C.Config, run_dir: Path, resume: bool) -> Path | None:
    """The run folder's latest checkpoint (None if none); refuses a run there unless resumed, same config."""
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if ckpt is not None and not resume:
        raise XmodalError(f"{run_dir}: already holds a run (checkpoint {ckpt.name}); "
                          f"pass --resume to continue it or choose another --out")
    if resume and ckpt is not None:
        changed = config_changes(ckpt / "config.yaml", cfg)
        if changed:
            raise XmodalError(f"{run_dir}: --resume with a different config than the run's "
                              f"({ckpt / 'config.yaml'}): {', '.join(changed)} differ; resume with the same "
                              "config and overrides")
    return ckpt


def _prepare_splits(cfg: C.Config, model: Any, task: Any, env: DistEnv, progress: bool,
                    datasets: tuple[Any, Any] = (None, None)) -> tuple[Any, Any]:
    """``(train split, val split)``; the val split only on rank 0 (None elsewhere).

    ``datasets``: the train and val datasets as :func:`check_data` read them (else read here).
    """
    from ..data.pipeline import prepare_split

    train_ds, val_ds = datasets
    # rank 0 fills the frozen-tower caches before the other processes read them
    train_split = in_turns(env, lambda: prepare_split(cfg, model, cfg.data.train_split, cfg.data.train_lang,
                                                      training=True, progress=progress, dataset=train_ds))
    val_split = (prepare_split(cfg, model, cfg.data.val_split, cfg.data.eval_lang, progress=progress,
                               dataset=val_ds)
                 if env.is_main else None)  # only rank 0 evaluates
    if hasattr(task, "attach_split"):  # tasks that draw beyond the batch (hard-negative pools)
        task.attach_split(cfg, train_split)
    return train_split, val_split


def _amp_setup(cfg: C.Config, device: torch.device, state: dict[str, Any],
               run_dir: Path) -> tuple[Any, bool, torch.dtype]:
    """``(grad scaler or None, use autocast, autocast dtype)`` of ``train.amp``; a resumed scaler restored."""
    amp = cfg.train.amp
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp: expected none, bf16 or fp16, got {amp!r}")
    # bf16 autocast runs on CPU too (oneDNN bf16 matmuls); fp16 autocast needs a GPU
    use_amp = amp != "none" and (device.type == "cuda" or amp == "bf16")
    if amp == "fp16" and device.type != "cuda":
        log.warning("train.amp=fp16 needs a CUDA device; training on %s in float32 (bf16 works on CPU)", device.type)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    restore_grad_scaler(scaler, state.pop("grad_scaler", None), run_dir)
    amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return scaler, use_amp, amp_dtype


@dataclass
class _Run:
    """A training run once set up: what its optimizer steps, evaluations and checkpoints use."""

    cfg: C.Config
    run_dir: Path
    env: DistEnv
    device: torch.device
    console: Any
    config_yaml: str
    model: Any
    loss: Any
    task: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    order: ShardedBatchOrder
    train_split: Any
    val_split: Any
    state: dict[str, Any]
    metric_log: MetricLog | None
    scaler: Any
    use_amp: bool
    amp_dtype: torch.dtype

    def optimizer_step(self, step: int, lr: float, training_step: Any) -> tuple[torch.Tensor, dict, dict]:
        """One optimizer step on the global batch of ``step``; ``(total loss, losses, metrics)``."""
        cfg, device, optimizer, scaler = self.cfg, self.device, self.optimizer, self.scaler
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_seed(self.env, cfg.train.seed, step)
        # the global batch and its positives; this process encodes its slice ``mine``
        text_idx, image_idx, mine = self.order.batch(step)
        batch = Batch(text_idx, image_idx,
                      positive_mask(self.train_split.dataset.gt, image_idx, text_idx),
                      self.train_split.images(image_idx[mine], device), self.train_split.texts(text_idx[mine], device))
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            losses, metrics = training_step(batch, step)
        total_loss = sum(losses.values())
        if not torch.isfinite(total_loss):
            raise XmodalError(f"step {step}: loss is {float(total_loss)}; lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.unscale_(optimizer)
        else:
            total_loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return total_loss, losses, metrics

    def evaluate(self, step: int) -> dict:
        """Validate at ``step`` (rank 0): log, keep the best model, count evaluations without progress."""
        from ..eval.encode import evaluate_split

        cfg, state = self.cfg, self.state
        res = evaluate_split(self.model, self.val_split, protocol="full", block_size=cfg.eval.block_size,
                             device=self.device, rerank_k=cfg.eval.rerank_k,
                             rerank_fusion=cfg.eval.rerank_fusion)
        m = res["metrics"]
        self.metric_log.write(step, "val", m)
        improved = m["rsum"] > state["best_rsum"]
        if improved:
            state.update(best_rsum=m["rsum"], best_step=step, best_metrics=m, bad_evals=0)
            save_best(self.run_dir, step, self.model, m, self.config_yaml, self.model.artifact_files())
        else:
            state["bad_evals"] += 1
        self.console.print(f"step {step:>6}  val rsum {m['rsum']:.1f}  t2i R@1 {m['t2i_r1']:.1f}  "
                           f"i2t R@1 {m['i2t_r1']:.1f}{'  (best)' if improved else ''}")
        return m

    def save_checkpoint(self, step: int) -> None:
        """Write the checkpoint of ``step`` (rank 0), with fp16's loss scale."""
        if self.scaler is not None:  # fp16's loss scale resumes where it was, not at 65,536
            self.state["grad_scaler"] = self.scaler.state_dict()
        if self.env.is_main:
            save_checkpoint(self.run_dir, step, self.model, self.loss, self.optimizer, self.state,
                            self.config_yaml, keep=self.cfg.train.keep_checkpoints)


def _loop(run: _Run, start: int, progress: bool) -> tuple[int, bool]:
    """Optimizer steps from ``start`` to ``train.steps`` with evaluations and checkpoints; ``(step, stopped early)``."""
    from ..progress import make_progress

    cfg, env, state = run.cfg, run.env, run.state
    total = cfg.train.steps
    step = start
    stopped_early = False
    run.task.train()
    training_step = data_parallel(run.task, env, run.device)
    t_train = time.perf_counter()
    with make_progress(enabled=progress) as prog:
        bar = prog.add_task("training", total=total, completed=start)
        while step < total:
            lr = lr_at(step, cfg.optim, total)
            total_loss, losses, metrics = run.optimizer_step(step, lr, training_step)
            step += 1
            prog.update(bar, completed=step)
            if run.metric_log is not None and cfg.train.log_every and step % cfg.train.log_every == 0:
                run.metric_log.write(step, "train", {"loss": float(total_loss.detach()), "lr": lr,
                                                     **{k: float(v.detach()) for k, v in losses.items()}, **metrics})
            did_eval = False
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                if env.is_main:
                    run.evaluate(step)
                    if cfg.train.early_stop and state["bad_evals"] >= cfg.train.early_stop:
                        stopped_early = True
                did_eval = True
                stopped_early = broadcast_flag(env, stopped_early, run.device)  # rank 0 decides for all
            if step == total:
                if env.is_main:
                    run.evaluate(step)
                did_eval = True
            every = cfg.train.checkpoint_every or cfg.train.eval_every
            if (every and step % every == 0) or did_eval or step == total or stopped_early:
                state["elapsed"] = float(state.get("elapsed", 0.0)) + (time.perf_counter() - t_train)
                t_train = time.perf_counter()
                run.save_checkpoint(step)
            if stopped_early:
                run.console.print(f"early stop at step {step}: no better val rsum in {cfg.train.early_stop} "
                                  "evaluations")
                break
    return step, stopped_early


def restore_grad_scaler(scaler: Any, saved: dict | None, run_dir: Path) -> None:
    """Give a resumed fp16 run its checkpoint's loss scale and growth tracker.

    A checkpoint of an fp16 run holds ``GradScaler.state_dict()`` (five numbers, JSON); without
    it a resumed run would restart from the initial scale and skip steps finding it again.
    """
    if scaler is None or not saved:
        return
    need = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    if not isinstance(saved, dict) or not need <= set(saved):
        raise XmodalError(f"{run_dir}: the checkpoint's grad_scaler state is malformed "
                          f"(expected the keys {', '.join(sorted(need))})")
    scaler.load_state_dict(saved)
