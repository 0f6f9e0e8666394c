"""Train a conditional GAN on the frozen embeddings of a trained retrieval run.

X-MRS shows that its shared space is rich enough to draw from: a generator conditioned on
an embedding synthesizes the food image. Here the conditions are the (L2-normalised,
frozen) embeddings of the run's training split: each sample is an image with, as its
condition, either its own image embedding or the embedding of one of its captions (a
fraction ``text_condition`` of the samples), so that at test time a caption's embedding
lands where the generator was trained. Losses: hinge GAN loss with a matching-aware
projection discriminator, the conditioning-augmentation KL term, and an L1 term to the
paired real image (``l1_weight``; 0 gives the plain conditional GAN), and a
retrieval-consistency term (``retrieval_weight``, see :func:`retrieval_loss`): the run's own
frozen image tower embeds the synthesized image and an InfoNCE over the batch's conditions
pulls it to its own condition, as R2GAN / CookGAN and X-MRS use the retrieval model to
make synthesized images carry their condition's semantics.

Every random draw of step ``k`` comes from ``(seed, k)``, so a resumed run repeats the
uninterrupted one exactly. Layout of a synthesis folder ``SYN``::

    SYN/synthesis.json         run, config, embed_dim, step (written last)
    SYN/generator.safetensors  generator weights (what ``xmodal synthesize`` loads)
    SYN/checkpoint.safetensors generator, discriminator and both optimizers (resume)
    SYN/metrics.jsonl          losses every ``log_every`` steps
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, XmodalError
from ..models.base import FrozenTowers, pixel_tower
from .gan import ConditionalGenerator, ProjectionDiscriminator, kl_to_unit_gaussian

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
FORMAT = "xmodal-synthesis"


@dataclass
class SynthesisConfig:
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    z_dim: int = 64
    cond_dim: int = 64
    g_base: int = 16
    d_base: int = 16
    #: weight of the L1 distance to the paired real image (0 = conditional GAN only)
    l1_weight: float = 50.0
    #: conditioning-augmentation KL weight; StackGAN's 1-2 drowned the condition in noise
    #: within this short a training (the generator became unconditional), hence small
    kl_weight: float = 0.02
    #: fraction of samples conditioned on a caption's embedding instead of the image's
    text_condition: float = 0.5
    #: weight of the retrieval-consistency term (0 = the plain GAN + L1 of earlier runs)
    retrieval_weight: float = 1.0
    #: InfoNCE temperature of that term (scores are cosines)
    retrieval_temperature: float = 0.1
    #: synthesized images per step sent through the image tower (0 = the whole batch); the
    #: backward pass through a pixel backbone dominates a step's cost on a CPU
    retrieval_batch: int = 8
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    #: split and caption language of the conditions (default: the run's train split / eval_lang)
    split: str | None = None
    lang: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "SynthesisConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"synthesis config: unknown keys {unknown}; valid: {sorted(names)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(float(b) for b in data["betas"])
        return cls(**data)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError("synthesis: steps must be >= 1 and batch_size >= 2")
        if not 0.0 <= self.text_condition <= 1.0:
            raise ConfigError(f"synthesis: text_condition must be in [0, 1], got {self.text_condition}")
        if self.retrieval_weight < 0 or self.retrieval_temperature <= 0 or self.retrieval_batch < 0:
            raise ConfigError("synthesis: retrieval_weight and retrieval_batch must be >= 0 and "
                              "retrieval_temperature > 0")


#: values of keys added after a synthesis folder was written that reproduce its training
#: (folders from before the retrieval term trained without it)
_ADDED_KEYS = {"retrieval_weight": 0.0, "retrieval_temperature": 0.1, "retrieval_batch": 8}


def saved_config(data: dict) -> dict:
    """A ``synthesis.json`` config with the keys added since it was written filled in."""
    return {**_ADDED_KEYS, **data}


# conditions ----------------------------------------------------------------------------------
@dataclass
class Conditions:
    """Frozen embeddings of one split and its pixels, for training or evaluating synthesis."""

    pixels: np.ndarray  # (N, 64, 64, 3) uint8
    image_emb: torch.Tensor  # (N, E)
    text_emb: torch.Tensor  # (M, E)
    texts_of_image: Any  # GroundTruth image -> texts (CSR)
    dataset: Any


def split_pixels(ds, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 pixels of a split's images (emoji's in-memory array, or files)."""
    from ..models.image.efficientnet import resize_center_crop

    from PIL import Image

    from ..data.images import open_image

    pixels = ds.meta.get("pixels")
    arr = np.asarray(pixels.load_ids(ds.image_ids)) if hasattr(pixels, "load_ids") else None  # (N, h, w, 3)
    if arr is not None and arr.shape[1:3] == (size, size):
        return arr
    out = np.empty((ds.num_images, size, size, 3), dtype=np.uint8)
    for i in range(ds.num_images):
        img = Image.fromarray(arr[i]) if arr is not None else open_image(ds.image_path(i))
        out[i] = resize_center_crop(img, size).permute(1, 2, 0).numpy()  # (size, size, 3)
    return out


def prepare_conditions(run: Any, split: str, lang: str | None, progress: bool = False) -> Conditions:
    """Embed a split of a :class:`~xmodal.models.run.Run`'s data with its (frozen) model."""
    from ..eval.encode import embed_split
    from ..data.pipeline import prepare_split

    cfg, model = run.config, run.model
    data = prepare_split(cfg, model, split, lang, progress=progress)
    img, txt = embed_split(model, data, progress=progress)
    return Conditions(split_pixels(data.dataset), img, txt, data.dataset.gt.transpose(), data.dataset)


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


# checkpoints -----------------------------------------------------------------------------------
def _optim_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}/{pid}/{key}"] = val.detach().cpu().contiguous().clone()
            else:
                plain.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _load_optim(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith(prefix + "/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = val
    for pid, st in meta["plain"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..utils import atomic_write

    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def _state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# retrieval consistency ---------------------------------------------------------------------------
@contextmanager
def grad_through_image_tower(model) -> Iterator[None]:
    """Let gradients reach the *input* of a frozen image tower (its weights stay fixed).

    Frozen towers run under ``no_grad`` to save memory when training a retrieval model; the
    synthesis loss needs d(embedding)/d(pixels) through the very same modules. The flags that
    switch grad off are lifted for the duration; parameters keep ``requires_grad=False``, so
    nothing of the tower is trained, and the modules stay in eval mode.
    """
    flags = [(model, "frozen_image")] if isinstance(model, FrozenTowers) else []
    flags += [(m, "frozen") for m in model.image_tower.modules() if isinstance(getattr(m, "frozen", None), bool)]
    saved = [(m, name, getattr(m, name)) for m, name in flags]
    try:
        for m, name, _ in saved:
            setattr(m, name, False)
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def embed_generated(model, images: torch.Tensor) -> torch.Tensor:
    """Differentiable image embeddings ``(B, D)`` of generated images ``(B, 3, 64, 64)`` in [-1, 1].

    The path of :func:`xmodal.synthesis.evaluate.embed_pixels` (``model.encode_image`` on
    64 x 64 pixels in [0, 255]) minus the rounding to uint8, so that the term optimises what
    the X-MRS check measures.
    """
    with grad_through_image_tower(model):
        return model.encode_image((images + 1.0) * 127.5).float()


def retrieval_loss(fake_emb: torch.Tensor, cond: torch.Tensor, same: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of synthesized images ``(k, D)`` over the batch's conditions ``(B, D)``, k <= B.

    Image ``i`` was drawn from condition ``i``; the other conditions of the batch are its
    negatives, except those of the same concept (``same (k, B)`` True: a caption and its
    images, or two images with a shared caption), which are left out of the denominator
    rather than pushed away. InfoNCE rather than a hinge triplet: every negative contributes
    a gradient from the first step (a margin-satisfied triplet gives none, a hardest-negative
    one gives one per image, unstable early on), and the retrieval runs this conditions on
    were themselves trained with InfoNCE, so the term asks the generator for the ranking
    the run's space was shaped for. Returns ``(loss, in-batch top-1 accuracy)``.
    """
    k = fake_emb.shape[0]
    logits = fake_emb @ cond.t() / temperature  # (k, B)
    own = torch.eye(k, cond.shape[0], dtype=torch.bool)  # (k, B)
    logits = logits.masked_fill(same & ~own, float("-inf"))
    target = torch.arange(k)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc


def same_concept(idx: np.ndarray, texts_of_image) -> torch.Tensor:
    """``(B, B)`` True where images ``idx[a]`` and ``idx[b]`` share a caption (and on the diagonal)."""
    counts = texts_of_image.counts()[idx]
    rows = np.repeat(np.arange(len(idx)), counts)
    cols = np.concatenate([texts_of_image.indices[texts_of_image.indptr[i]:texts_of_image.indptr[i + 1]]
                           for i in idx]) if counts.sum() else np.zeros(0, np.int64)
    member = np.zeros((len(idx), int(texts_of_image.indices.max(initial=-1)) + 1), dtype=np.float32)  # (B, M)
    member[rows, cols] = 1.0
    same = (member @ member.T) > 0  # (B, B)
    np.fill_diagonal(same, True)
    return torch.from_numpy(same)


# training ----------------------------------------------------------------------------------------
def _batch(step: int, cfg: SynthesisConfig, cond: Conditions
           ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Generator]:
    """Images, conditions and mismatched conditions of step ``step``: a function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    n = len(cond.pixels)
    idx = rng.choice(n, size=min(cfg.batch_size, n), replace=False)
    e = cond.image_emb[idx].clone()  # (B, E)
    counts = cond.texts_of_image.counts()[idx]
    use_text = (rng.random(len(idx)) < cfg.text_condition) & (counts > 0)
    pick = (rng.random(len(idx)) * np.maximum(counts, 1)).astype(np.int64)
    for b in np.flatnonzero(use_text):
        t = cond.texts_of_image.indices[cond.texts_of_image.indptr[idx[b]] + pick[b]]
        e[b] = cond.text_emb[t]
    wrong = torch.roll(e, shifts=1, dims=0)  # another sample's condition: matching-aware negatives
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return idx, e, wrong, gen


def train_synthesis(run: str | Path, out: str | Path, cfg: SynthesisConfig | None = None, *, resume: bool = False,
                    progress: bool = True, console: Any = None) -> dict:
    """Train a generator on the embeddings of run ``run``; write ``out`` (see module docstring)."""
    from rich.console import Console

    from ..models import load
    from ..progress import make_progress
    from ..utils import seed_everything

    cfg = cfg or SynthesisConfig()
    cfg.validate()
    console = console or Console(stderr=True)
    out = Path(out)
    ckpt_path = out / "checkpoint.safetensors"
    config_json = {"run": str(Path(run).resolve()), "config": dataclasses.asdict(cfg)}
    _check_resume(out, ckpt_path, config_json, resume)
    run_ = load(run)
    model, tcfg = run_.model, run_.config
    split = cfg.split or tcfg.data.train_split
    lang = cfg.lang or tcfg.data.eval_lang
    t0 = time.perf_counter()
    cond = prepare_conditions(run_, split, lang, progress=progress)
    console.print(f"[bold]synthesis[/] conditions: {cond.dataset.summary()} "
                  f"({time.perf_counter() - t0:.0f} s)")
    tower = None
    if cfg.retrieval_weight > 0:
        pixel_tower(model, f"synthesis: retrieval_weight (run {run})")
        tower = model.eval().requires_grad_(False)  # the run's own tower, frozen: only G learns
    del model
    embed_dim = int(cond.image_emb.shape[1])

    seed_everything(cfg.seed)
    G = ConditionalGenerator(embed_dim, cfg.z_dim, cfg.cond_dim, cfg.g_base)
    D = ProjectionDiscriminator(embed_dim, cfg.d_base)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    start = 0
    if resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, G, D, opt_g, opt_d)
        console.print(f"resuming {out} from step {start}")
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, **config_json, "embed_dim": embed_dim, "image_size": IMAGE_SIZE}

    G.train()
    D.train()
    step = start
    last: dict[str, float] = {}
    with make_progress(enabled=progress) as prog:
        bar = prog.add_task("training synthesis", total=cfg.steps, completed=start)
        while step < cfg.steps:
            terms = _train_step(step, cfg, cond, G, D, opt_g, opt_d, tower)
            step += 1
            prog.update(bar, completed=step)
            last = {name: float(v.detach()) for name, v in terms.items()}
            if not all(np.isfinite(v) for v in last.values()):
                raise XmodalError(f"synthesis step {step}: non-finite loss {last}; lower the learning rate")
            if cfg.log_every and step % cfg.log_every == 0:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step, **last}) + "\n")
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                _save_checkpoint(out, G, D, opt_g, opt_d, info, step)
    return {"out": str(out), "steps": step, "last": last}


def _check_resume(out: Path, ckpt_path: Path, config_json: dict, resume: bool) -> None:
    """Refuse to overwrite a synthesis folder, or to resume one with other settings than ``--steps``."""
    if ckpt_path.exists() and not resume:
        raise XmodalError(f"{out}: already holds a synthesis run; pass --resume to continue it or choose another --out")
    if resume and ckpt_path.exists():
        saved = json.loads((out / "synthesis.json").read_text())
        saved["config"] = saved_config(saved.get("config", {}))
        # only the step budget may change on resume (to train longer)
        same = lambda d: {**d, "config": {**d["config"], "steps": None}}  # noqa: E731
        if same({k: saved.get(k) for k in config_json}) != same(json.loads(json.dumps(config_json))):
            raise XmodalError(f"{out}: --resume with different settings than {out / 'synthesis.json'} "
                              "(only --steps may change)")


def _load_checkpoint(ckpt_path: Path, G: ConditionalGenerator, D: ProjectionDiscriminator,
                     opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> int:
    """Restore both networks and optimizers from ``ckpt_path``; the step it was saved at."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt_path))
    with safe_open(str(ckpt_path), "pt") as fh:
        meta = fh.metadata()
    G.load_state_dict(_strip(tensors, "G"))
    D.load_state_dict(_strip(tensors, "D"))
    _load_optim(opt_g, "opt_g", tensors, json.loads(meta["opt_g"]))
    _load_optim(opt_d, "opt_d", tensors, json.loads(meta["opt_d"]))
    return int(meta["step"])


def _save_checkpoint(out: Path, G: ConditionalGenerator, D: ProjectionDiscriminator, opt_g: torch.optim.Optimizer,
                     opt_d: torch.optim.Optimizer, info: dict, step: int) -> None:
    """Write the checkpoint, the generator and (last) ``synthesis.json`` at ``step``."""
    from ..utils import atomic_write_json

    tg, mg = _optim_tensors("opt_g", opt_g)
    td, md = _optim_tensors("opt_d", opt_d)
    _save_tensors(out / "checkpoint.safetensors", {**_state(G, "G"), **_state(D, "D"), **tg, **td},
                  {"step": str(step), "opt_g": json.dumps(mg), "opt_d": json.dumps(md)})
    _save_tensors(out / "generator.safetensors", _state(G, "G"), {"step": str(step)})
    atomic_write_json(out / "synthesis.json", {**info, "step": step})


def _train_step(step: int, cfg: SynthesisConfig, cond: Conditions, G: ConditionalGenerator,
                D: ProjectionDiscriminator, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                tower: Any) -> dict[str, torch.Tensor]:
    """One discriminator and one generator update on the batch of ``step``; the loss terms."""
    idx, e, wrong, gen = _batch(step, cfg, cond)
    real = to_unit(cond.pixels[idx])  # (B, 3, 64, 64)
    z = torch.randn(len(idx), cfg.z_dim, generator=gen)
    eps = torch.randn(len(idx), cfg.cond_dim, generator=gen)
    fake, mu, logvar = G(e, z, eps)
    # discriminator: real+matching is real; generated, and real+mismatched, are fake
    d_real = D(real, e)
    d_fake = D(fake.detach(), e)
    d_wrong = D(real, wrong)
    d_loss = F.relu(1 - d_real).mean() + 0.5 * (F.relu(1 + d_fake).mean() + F.relu(1 + d_wrong).mean())
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    adv = -D(fake, e).mean()
    l1 = (fake - real).abs().mean()
    kl = kl_to_unit_gaussian(mu, logvar)
    g_loss = adv + cfg.l1_weight * l1 + cfg.kl_weight * kl
    terms = {"d_loss": d_loss, "g_adv": adv, "l1": l1, "kl": kl}
    if tower is not None:
        k = cfg.retrieval_batch or len(idx)  # the batch is a random draw: its first k are too
        fake_emb = embed_generated(tower, fake[:k])  # (k, D)
        ret, acc = retrieval_loss(fake_emb, e, same_concept(idx, cond.texts_of_image)[:k],
                                  cfg.retrieval_temperature)
        g_loss = g_loss + cfg.retrieval_weight * ret
        terms.update(retrieval=ret, retrieval_acc=acc)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return terms


# inference ---------------------------------------------------------------------------------------
def load_synthesizer(syn_dir: str | Path, device: str = "cpu") -> tuple[ConditionalGenerator, dict]:
    """The trained generator of a synthesis folder (eval mode) and its ``synthesis.json``."""
    from safetensors.torch import load_file

    syn_dir = Path(syn_dir)
    info_path = syn_dir / "synthesis.json"
    if not info_path.exists() or not (syn_dir / "generator.safetensors").exists():
        raise XmodalError(f"{syn_dir}: not a synthesis folder (run xmodal train-synthesis RUN --out {syn_dir})")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise XmodalError(f"{info_path}: expected format {FORMAT!r}, got {info.get('format')!r}")
    c = SynthesisConfig.from_dict(saved_config(info["config"]))
    G = ConditionalGenerator(int(info["embed_dim"]), c.z_dim, c.cond_dim, c.g_base)
    missing, unexpected = G.load_state_dict(_strip(load_file(str(syn_dir / "generator.safetensors")), "G"),
                                            strict=False)
    if missing or unexpected:
        raise XmodalError(f"{syn_dir / 'generator.safetensors'}: weights do not match the generator "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return G.to(device).eval(), info


@torch.no_grad()
def synthesize(G: ConditionalGenerator, emb: torch.Tensor, *, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Images ``(B, 64, 64, 3)`` uint8 for embeddings ``(B, E)``: mean condition, noise from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(emb), G.z_dim, generator=gen)
    out = [to_uint8(G(emb[s:s + batch_size].float(), z[s:s + batch_size])[0]) for s in range(0, len(emb), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
