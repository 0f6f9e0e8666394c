"""Contract tests over every registered model type (as timm's ``tests/test_models.py``).

Every name in :func:`xmodal.models.list_models` must have at least one tiny config in
:data:`CASES` (checked by :func:`test_contract_covers_every_registered_model`), and every
case must pass the same contract:

1. **hooks**: :func:`xmodal.models.run.scorer_kind` agrees with ``isinstance`` of
   :class:`EmbeddingScorer` / :class:`PairScorer`; every hook declared on
   :class:`xmodal.models.base.Scorer` is callable and returns its declared type (a hook
   added to ``Scorer`` without a check in :data:`HOOK_CHECKS` fails the suite).
2. **shapes**: embedding scorers give L2-normalised ``(N, D)`` embeddings on both sides; pair
   scorers give a finite ``(Ni, Nt)`` score matrix (and ``score_pairs`` agrees with it when
   declared). An item's output does not depend on the other items of its batch (evaluation
   encodes in blocks).
3. **training step**: the loss the config names, the task the model names
   (:func:`xmodal.train.tasks.build_task`), one ``training_step`` on a batch the training
   split gives (as the loop builds it), backward: a trainable parameter gets a finite,
   non-zero gradient and no gradient is NaN/inf. ``param_groups`` feeds the loop's optimiser.
4. **save / load**: the trained model saved as training saves it (``config.yaml`` +
   :func:`xmodal.train.checkpoint.save_best`) comes back through :func:`xmodal.models.load`
   as a :class:`Run` with the right ``kind`` / ``step`` / config and identical outputs.

Models that need no training (``needs_training() is False``: the ADAPT ensemble ``variant:
ens``) are assembled from finished runs: their members are tiny runs saved by the
:func:`member_runs` fixture, the loop must refuse to train them, and their round trip is the
config-only one (``load(CONFIG.yaml)``), checked against the average of the members' scores.

Everything runs on synthetic precomp regions (``train_fixtures.write_synthetic_precomp``,
3 x 16-d regions per image) with feature-row image towers and tiny BiGRU / random transformer
text sides; the cross-encoder reads only MiniLM's tokenizer (its weights are random).
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import write_synthetic_precomp  # noqa: E402

from xmodal.config import Config, load_config, save as save_config, to_dict  # noqa: E402
from xmodal.errors import ConfigError  # noqa: E402
from xmodal.models import Run, create_model, list_models, load  # noqa: E402
from xmodal.models.base import EmbeddingScorer, PairScorer, Scorer  # noqa: E402
from xmodal.models.run import KINDS, model_state, scorer_kind  # noqa: E402

REGION_DIM = 16  # write_synthetic_precomp's default feature size
BATCH = 4  # training batch: texts 0, 2, 4, 6 with images 0..3 (2 captions per image, in order)
N_IMAGES, N_TEXTS = 3, 5  # inference inputs; Ni != Nt so a transposed matrix fails
ATOL = 1e-6  # round trip: same weights, same inputs, same ops
BATCH_ATOL = 1e-5  # an item alone vs in a padded batch (masked padding, other kernels' sums)


# ------------------------------------------------------------------------------------------
# tiny configs, one or more per registered model type
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A tiny config of one registered model type (``model`` / ``loss`` sections as dicts)."""

    type: str
    model: dict
    loss: dict | None = None
    #: cases whose saved runs this one is assembled from (``model.args.members``)
    members: tuple[str, ...] = ()


def _features(out_dim: int | None = 16, frozen: bool = False) -> dict:
    args = {"in_dim": REGION_DIM} if out_dim is None else {"in_dim": REGION_DIM, "out_dim": out_dim}
    return {"name": "features", "args": args, "frozen": frozen}


# no tokenizer_json: the loop's prepare_config trains the vocabulary on the training captions
_BIGRU = {"name": "bigru", "args": {"word_dim": 8, "out_dim": 16}, "frozen": False}
_ALADIN_ARGS = {"dim": 16, "depth": 1, "heads": 2, "ff_dim": 32, "dropout": 0.0, "box_dim": 0, "match_layers": 1,
                "match_heads": 2, "align_skip_image": [1, 0], "align_skip_text": [0, 0]}
_ALADIN_LOSS = {"name": "aladin", "args": {"terms": ["alignment", "distillation"], "max_violation": False}}

CASES: dict[str, Case] = {
    "dual_encoder": Case("dual_encoder", {"embed_dim": 16, "image": _features(), "text": _BIGRU},
                         {"name": "hinge", "args": {"margin": 0.2, "max_violation": False}}),
    # a frozen (random, so saved) image tower: the trainer feeds its cached outputs
    "dual_encoder-frozen_image": Case("dual_encoder",
                                      {"embed_dim": 16, "image": _features(frozen=True), "text": _BIGRU},
                                      {"name": "infonce", "args": {}}),
    "adapt-t2i": Case("adapt", {"image": _features(), "text": _BIGRU, "args": {"variant": "t2i", "fused": "eager"}},
                      {"name": "adapt_hinge", "args": {"margin": 0.2, "beta": 0.9}}),
    "adapt-i2t": Case("adapt", {"image": _features(), "text": _BIGRU, "args": {"variant": "i2t", "fused": "eager"}},
                      {"name": "adapt_hinge", "args": {"margin": 0.2, "beta": 0.9}}),
    # ADAPT-Ens: two finished runs averaged, nothing to train (members filled in by make_config)
    "adapt-ens": Case("adapt", {"args": {"variant": "ens"}}, None, members=("adapt-t2i", "adapt-i2t")),
    "aladin-alignment": Case("aladin", {"image": _features(None, frozen=True), "text": _BIGRU,
                                        "args": {**_ALADIN_ARGS, "eval_head": "alignment"}}, _ALADIN_LOSS),
    "aladin-matching": Case("aladin", {"image": _features(None, frozen=True), "text": _BIGRU,
                                       "args": {**_ALADIN_ARGS, "eval_head": "matching"}}, _ALADIN_LOSS),
    "cross_encoder": Case("cross_encoder",
                          {"image": _features(32), "args": {"text_init_weights": False, "dim": 32, "depth": 1,
                                                            "heads": 4, "ff_dim": 64, "box_dim": 0, "pair_batch": 64,
                                                            "dropout": 0.0, "init_std": 0.15}},
                          {"name": "iais", "args": {"negatives": 4, "hard_negatives": 2,
                                                    "alignment": "distributed"}}),
}
TRAINED = [c for c in CASES if not CASES[c].members]


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_precomp(tmp_path_factory.mktemp("contract_data"),
                                   sizes=(("train", 12), ("dev", 4), ("test", N_IMAGES + 1)))


def make_config(folder: Path, case_id: str, data: Path, runs: dict[str, Path] | None = None) -> Config:
    """The resolved config of a case, as the loop has it before it saves ``config.yaml``."""
    from xmodal.train.loop import prepare_config

    case = CASES[case_id]
    model = copy.deepcopy(case.model)
    model["type"] = case.type
    if case.members:
        model["args"]["members"] = [str(runs[m]) for m in case.members]
    tree: dict[str, Any] = {
        "name": f"contract-{case_id}",
        "data": {"format": "precomp", "path": str(data), "train_split": "train", "val_split": "dev",
                 "test_split": "test"},
        "model": model,
        "optim": {"name": "adam", "lr": 0.01, "schedule": "constant"},
        "train": {"steps": 1, "batch_size": BATCH, "eval_every": 1, "log_every": 0, "tensorboard": False},
    }
    if case.loss is not None:
        tree["loss"] = case.loss
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_id}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(path)
    prepare_config(cfg)  # a BiGRU without a vocabulary gets one from the training captions
    return cfg


def build(cfg: Config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(cfg.model)


def config_yaml(cfg: Config) -> str:
    """The resolved config as ``train/loop.py`` writes it."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_run(run_dir: Path, step: int, model: nn.Module, cfg: Config) -> None:
    """Save ``model`` as training does: ``RUN/config.yaml``, then ``RUN/best`` via save_best."""
    from xmodal.train.checkpoint import save_best
    from xmodal.utils import atomic_write_text

    text = config_yaml(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", text)
    save_best(run_dir, step, model, {"rsum": 1.0}, text, model.artifact_files())


@pytest.fixture(scope="module")
def member_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Saved (untrained) runs of every case some other case is assembled from."""
    root = tmp_path_factory.mktemp("contract_members")
    runs = {}
    for case_id in sorted({m for c in CASES.values() for m in c.members}):
        cfg = make_config(root, case_id, data_dir)
        runs[case_id] = root / case_id
        save_run(runs[case_id], 1, build(cfg, seed=len(runs)).eval(), cfg)
    return runs


@pytest.fixture
def case_config(request, tmp_path, data_dir) -> Callable[[str], Config]:
    """``case_config(case_id) -> cfg``; member runs are built only for the cases that need them."""

    def make(case_id: str) -> Config:
        runs = request.getfixturevalue("member_runs") if CASES[case_id].members else None
        return make_config(tmp_path / "cfg", case_id, data_dir, runs)

    return make


def raw_inputs(data: Path) -> tuple[torch.Tensor, list[str]]:
    """Inference inputs: region rows ``(Ni, 3, 16)`` and ``Nt`` captions of different lengths."""
    regions = torch.from_numpy(np.load(data / "test_ims.npy")[:N_IMAGES]).float()
    captions = (data / "test_caps.txt").read_text().splitlines()[:N_TEXTS - 1] + ["a red circle"]
    return regions, captions


def outputs(model: nn.Module, images: Any, texts: Any) -> dict[str, torch.Tensor]:
    """What a model scores ``images`` x ``texts`` with: embeddings and/or the pair score matrix."""
    out = {}
    with torch.no_grad():
        if isinstance(model, EmbeddingScorer):
            out["image_emb"] = model.encode_image(images)
            out["text_emb"] = model.encode_text(texts)
        if isinstance(model, PairScorer):
            out["scores"] = model.score(model.encode_image_reps(images), model.encode_text_reps(texts))
    return out


def train_one_step(cfg: Config, model: nn.Module, run_dir: Path, optimizer_step: bool = False):
    """One training step as ``train/loop.py`` takes it: loss, task, prepare_training, the
    training split's inputs, a batch with its positives mask, backward (and the optimiser).

    Returns ``(losses, metrics, trainable parameters)``.
    """
    from xmodal.data.inputs import Batch, positive_mask
    from xmodal.data.pipeline import prepare_split
    from xmodal.losses import create_loss
    from xmodal.train.loop import make_optimizer, param_groups
    from xmodal.train.tasks import build_task

    loss = create_loss(cfg.loss.name, **cfg.loss.args)
    task = build_task(model, loss)
    model.prepare_training(cfg, run_dir)
    split = prepare_split(cfg, model, cfg.data.train_split, cfg.data.train_lang, training=True, progress=False)
    if hasattr(task, "attach_split"):  # tasks that draw beyond the batch (hard-negative pools)
        task.attach_split(cfg, split)
    params = [p for p in task.parameters() if p.requires_grad]
    assert params, "nothing to train: every parameter is frozen"
    optimizer = make_optimizer(param_groups(model, params, cfg), cfg.optim, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
    text_idx, image_idx = np.arange(0, 2 * BATCH, 2), np.arange(BATCH)
    pos_mask = torch.eye(BATCH, dtype=torch.bool)
    assert torch.equal(positive_mask(split.dataset.gt, image_idx, text_idx), pos_mask)  # the data's pairs
    batch = Batch(text_idx, image_idx, pos_mask, split.images(image_idx, "cpu"), split.texts(text_idx, "cpu"))
    task.train()
    losses, metrics = task.training_step(batch, step=0)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    if optimizer_step:
        optimizer.step()
    return losses, metrics, params


def _cases(ids: list[str] | None = None):
    return pytest.mark.parametrize("case_id", ids or list(CASES))


# ------------------------------------------------------------------------------------------
# the registry is covered
# ------------------------------------------------------------------------------------------
def test_contract_covers_every_registered_model():
    registered, covered = set(list_models()), {c.type for c in CASES.values()}
    missing = sorted(registered - covered)
    assert not missing, (f"model type(s) {missing} are registered without a tiny contract config: add a Case "
                         "for each to CASES in tests/test_contract_models.py (a small config that builds in "
                         "a second and trains one step on the synthetic precomp data)")
    stale = sorted(covered - registered)
    assert not stale, f"CASES in tests/test_contract_models.py name unregistered model types {stale}"


# ------------------------------------------------------------------------------------------
# 1. scorer kind and the Scorer hooks
# ------------------------------------------------------------------------------------------
def _check_tower(model: Scorer, cfg: Config, tmp: Path) -> None:
    for side in ("image", "text"):
        tower = model.tower(side)
        assert tower is None or isinstance(tower, nn.Module), (side, type(tower))
    with pytest.raises(ValueError):
        model.tower("audio")


def _check_param_groups(model: Scorer, cfg: Config, tmp: Path) -> None:
    groups = model.param_groups(cfg)
    if groups is None:
        return
    assert isinstance(groups, list) and groups
    own = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for g in groups:
        assert isinstance(g, dict) and isinstance(g["params"], list), g
        assert isinstance(float(g.get("lr_scale", 1.0)), float)
        for p in g["params"]:
            assert isinstance(p, nn.Parameter) and id(p) in own, "param_groups lists a foreign parameter"
            assert id(p) not in seen, "param_groups lists a parameter twice"
            seen.add(id(p))


def _check_artifacts(model: Scorer, cfg: Config, tmp: Path) -> None:
    files = model.artifact_files()
    assert isinstance(files, dict)
    for name, content in files.items():
        assert isinstance(name, str) and name not in ("model.safetensors", "state.json", "config.yaml"), name
        assert isinstance(content, str) or json.dumps(content) is not None


def _check_input_needs(model: Scorer, cfg: Config, tmp: Path) -> None:
    needs = model.input_needs()
    assert needs is None or (isinstance(needs, tuple) and len(needs) == 2
                             and all(isinstance(n, str) for n in needs)), needs


def _check_task_name(model: Scorer, cfg: Config, tmp: Path) -> None:
    from xmodal.train.tasks import TASKS

    name = model.task_name()
    assert isinstance(name, str) and name in TASKS.names(), f"task {name!r} is not registered ({TASKS.names()})"


def _check_frozen(model: Scorer, cfg: Config, tmp: Path) -> None:
    prefixes = model.frozen_prefixes()
    assert isinstance(prefixes, list) and all(isinstance(p, str) and p.endswith(".") for p in prefixes), prefixes


def _check_needs_training(model: Scorer, cfg: Config, tmp: Path) -> None:
    assert isinstance(model.needs_training(), bool)


def _check_prepare(model: Scorer, cfg: Config, tmp: Path) -> None:
    assert model.prepare_training(cfg, tmp) is None


#: one check per hook declared on ``Scorer``: (model, cfg, tmp dir) -> None
HOOK_CHECKS: dict[str, Callable[[Scorer, Config, Path], None]] = {
    "task_name": _check_task_name, "input_needs": _check_input_needs, "tower": _check_tower,
    "frozen_prefixes": _check_frozen, "param_groups": _check_param_groups, "needs_training": _check_needs_training,
    "prepare_training": _check_prepare, "artifact_files": _check_artifacts,
}


def test_contract_hook_checks_cover_the_scorer_interface():
    declared = {n for n, v in vars(Scorer).items() if callable(v) and not n.startswith("_")}
    assert declared == set(HOOK_CHECKS), (f"Scorer declares hooks {sorted(declared - set(HOOK_CHECKS))} without a "
                                          "contract check; add one to HOOK_CHECKS (stale: "
                                          f"{sorted(set(HOOK_CHECKS) - declared)})")


@_cases()
def test_contract_scorer_kind_and_hooks(case_id, case_config, tmp_path):
    cfg = case_config(case_id)
    model = build(cfg)
    assert isinstance(model, Scorer), type(model)
    kind = scorer_kind(model)
    assert kind in KINDS
    assert (kind == "embedding") == isinstance(model, EmbeddingScorer)
    assert (kind == "pair") == (isinstance(model, PairScorer) and not isinstance(model, EmbeddingScorer))
    for name, check in HOOK_CHECKS.items():
        assert callable(getattr(model, name)), name
        check(model, cfg, tmp_path)
    assert model.needs_training() is not bool(CASES[case_id].members)


# ------------------------------------------------------------------------------------------
# 2. encoders and scores
# ------------------------------------------------------------------------------------------
@_cases()
def test_contract_encode_and_score_shapes(case_id, case_config, data_dir):
    cfg = case_config(case_id)
    model = build(cfg).eval()
    images, texts = raw_inputs(data_dir)
    out = outputs(model, images, texts)
    assert out, f"{type(model).__name__} is neither an embedding nor a pair scorer"
    if isinstance(model, EmbeddingScorer):
        img, txt = out["image_emb"], out["text_emb"]
        assert img.ndim == 2 and img.shape[0] == N_IMAGES, img.shape
        assert txt.ndim == 2 and txt.shape[0] == N_TEXTS, txt.shape
        assert img.shape[1] == txt.shape[1], "image and text embeddings differ in size"
        for name, emb in (("image", img), ("text", txt)):
            assert torch.isfinite(emb).all(), name
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5, rtol=0, msg=name)
        with torch.no_grad():  # an item's embedding does not depend on its batch (eval encodes blocks)
            torch.testing.assert_close(model.encode_image(images[1:2]), img[1:2], atol=BATCH_ATOL, rtol=0)
            torch.testing.assert_close(model.encode_text(texts[-1:]), txt[-1:], atol=BATCH_ATOL, rtol=0)
    if isinstance(model, PairScorer):
        scores = out["scores"]
        assert scores.shape == (N_IMAGES, N_TEXTS), scores.shape
        assert scores.is_floating_point() and torch.isfinite(scores).all(), scores
        with torch.no_grad():
            img_reps, txt_reps = model.encode_image_reps(images), model.encode_text_reps(texts)
            # one image / the shortest caption alone score as in the padded block
            alone = model.score(model.encode_image_reps(images[1:2]), model.encode_text_reps(texts[-1:]))
            torch.testing.assert_close(alone, scores[1:2, -1:], atol=BATCH_ATOL, rtol=0)
            if model.has_score_pairs():
                ii, tt = torch.tensor([2, 0, 1, 1]), torch.tensor([4, 0, 3, 1])
                torch.testing.assert_close(model.score_pairs(img_reps, txt_reps, ii, tt), scores[ii, tt],
                                           atol=BATCH_ATOL, rtol=0)
            try:
                first = model.first_stage_embeddings(img_reps, txt_reps)
            except ConfigError:  # the cross-encoder without model.args.first_stage says so instead of None
                first = None
        if first is not None:
            fi, ft = first
            assert fi.shape[0] == N_IMAGES and ft.shape[0] == N_TEXTS and fi.shape[1] == ft.shape[1]


# ------------------------------------------------------------------------------------------
# 3. one training step
# ------------------------------------------------------------------------------------------
@_cases()
def test_contract_training_step(case_id, case_config, tmp_path):
    cfg = case_config(case_id)
    model = build(cfg)
    if not model.needs_training():
        # an ensemble of finished runs: the loop refuses it, its members trained separately
        from xmodal.train.loop import train

        with pytest.raises(ConfigError, match="nothing to train"):
            train(cfg, tmp_path / "run", progress=False)
        return
    losses, metrics, params = train_one_step(cfg, model, tmp_path / "run")
    assert losses and all(k.endswith("_loss") for k in losses), losses
    for k, v in losses.items():
        assert torch.is_tensor(v) and v.ndim == 0 and torch.isfinite(v), (k, v)
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    grads = {id(p): p.grad for p in params if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values()), "a gradient is NaN or inf"
    moved = [g for g in grads.values() if float(g.abs().sum()) > 0]
    assert moved, f"no trainable parameter of {type(model).__name__} got a non-zero gradient"
    named = {id(p): n for n, p in model.named_parameters()}
    assert any(id(p) in named and p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params), \
        "only the loss's own parameters got a gradient, none of the model's"


# ------------------------------------------------------------------------------------------
# 4. save -> load
# ------------------------------------------------------------------------------------------
@_cases(TRAINED)
def test_contract_save_load_round_trip(case_id, case_config, tmp_path, data_dir):
    cfg = case_config(case_id)
    model = build(cfg)
    run_dir = tmp_path / "run"
    train_one_step(cfg, model, run_dir, optimizer_step=True)  # weights (and BatchNorm statistics) move
    model.eval()
    images, texts = raw_inputs(data_dir)
    before = outputs(model, images, texts)
    save_run(run_dir, 7, model, cfg)

    torch.manual_seed(1234)  # whatever load initialises randomly must be overwritten by the checkpoint
    run = load(run_dir)
    assert isinstance(run, Run)
    assert type(run.model) is type(model) and not run.model.training
    assert run.kind == scorer_kind(model) and run.step == 7
    assert run.path == run_dir and run.checkpoint == run_dir / "best"
    assert to_dict(run.config) == to_dict(cfg)
    loaded_state = run.model.state_dict()
    for key, value in model_state(model).items():
        assert torch.equal(loaded_state[key], value), key
    after = outputs(run.model, images, texts)
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=ATOL, rtol=0, msg=key)
    # not vacuous: a freshly built model (other random weights) scores differently
    fresh = outputs(build(cfg, seed=4321).eval(), images, texts)
    assert any(not torch.allclose(fresh[k], before[k], atol=1e-4) for k in before), "fresh model scores the same"


@_cases([c for c in CASES if CASES[c].members])
def test_contract_assembled_model_round_trip(case_id, case_config, tmp_path, data_dir, member_runs):
    """A model assembled from finished runs is saved as its config: ``load(CONFIG.yaml)``
    rebuilds it from its members' checkpoints, with the scores of the members averaged."""
    cfg = case_config(case_id)
    path = tmp_path / f"{case_id}.yaml"
    save_config(cfg, path)
    model = build(cfg).eval()
    images, texts = raw_inputs(data_dir)
    before = outputs(model, images, texts)

    run = load(path)
    assert isinstance(run, Run) and type(run.model) is type(model) and not run.model.training
    assert run.kind == scorer_kind(model) and run.step is None and run.checkpoint is None and run.path == path
    after = outputs(run.model, images, texts)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=ATOL, rtol=0, msg=key)
    members = [outputs(load(member_runs[m]).model, images, texts)["scores"] for m in CASES[case_id].members]
    torch.testing.assert_close(before["scores"], torch.stack(members).mean(0), atol=ATOL, rtol=0)
