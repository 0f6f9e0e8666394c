"""Cross-fitting: folds that keep linked items together, training without a fold
(``data.train_holdout``), and a cross-encoder whose pools and fused scores come from
out-of-fold first stages (``loss.args.cross_fit``), checked against brute force."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.config import load_config
from xmodal.data.base import GroundTruth, item_folds
from xmodal.errors import ConfigError
from xmodal.data.pipeline import holdout_args, load_split

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import write_synthetic_precomp, write_tiny_config  # noqa: E402


def _components(gt: GroundTruth) -> list[set]:
    """Connected components of the text-image graph by breadth-first search (the reference)."""
    m = gt.num_texts
    adj: dict[int, set] = {x: set() for x in range(m + gt.num_images)}
    for t, i in zip(*gt.pairs()):
        adj[int(t)].add(m + int(i))
        adj[m + int(i)].add(int(t))
    seen, out = set(), []
    for start in adj:
        if start in seen:
            continue
        comp, todo = set(), [start]
        while todo:
            x = todo.pop()
            if x not in comp:
                comp.add(x)
                todo.extend(adj[x] - comp)
        seen |= comp
        out.append(comp)
    return out


def test_item_folds_keep_linked_items_together_and_balance():
    rng = np.random.default_rng(0)
    # 60 texts over 50 images: some texts with 2 images (an emoji in two styles), 3 lone images
    t = np.concatenate([np.arange(60), rng.choice(60, 20, replace=False)])
    i = np.concatenate([rng.integers(0, 47, 60), rng.integers(0, 47, 20)])
    gt = GroundTruth.from_pairs(t, i, 60, 50)
    tf, imf = item_folds(gt, 4, seed=3)
    assert tf.shape == (60,) and imf.shape == (50,) and set(tf.tolist()) == set(range(4))
    m = gt.num_texts
    for comp in _components(gt):
        folds = {int(tf[x]) if x < m else int(imf[x - m]) for x in comp}
        assert len(folds) == 1  # a component is never split
    for tt, ii in zip(*gt.pairs()):
        assert tf[tt] == imf[ii]  # hence no positive crosses folds
    sizes = np.bincount(tf, minlength=4)
    widest = max(sum(1 for x in c if x < m) for c in _components(gt))
    assert sizes.max() - sizes.min() <= widest
    np.testing.assert_array_equal(item_folds(gt, 4, seed=3)[0], tf)  # deterministic
    assert not np.array_equal(item_folds(gt, 4, seed=4)[0], tf)
    with pytest.raises(ConfigError, match="folds"):
        item_folds(gt, 1)
    with pytest.raises(ConfigError, match="only 2 groups"):
        item_folds(GroundTruth.from_pairs(np.array([0, 1]), np.array([0, 1]), 2, 2), 3)


def test_train_holdout_drops_one_fold_of_the_training_split(tmp_path):
    data = write_synthetic_precomp(tmp_path / "data")
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data))
    full = load_split(cfg, "train", "en", training=True)
    cfg.data.train_holdout = {"folds": 3, "fold": 1, "seed": 0}
    rest = load_split(cfg, "train", "en", training=True)
    inside = full.holdout(3, 1, 0, keep="fold")
    assert rest.num_images + inside.num_images == full.num_images
    assert rest.num_texts + inside.num_texts == full.num_texts
    assert not set(rest.image_ids) & set(inside.image_ids) and not set(rest.text_ids) & set(inside.text_ids)
    assert rest.gt.nnz + inside.gt.nnz == full.gt.nnz  # no positive pair lost or split
    assert load_split(cfg, "dev", "en").num_images == 40  # evaluation splits are untouched
    for bad in ({"folds": 3}, {"folds": 1, "fold": 0}, {"folds": 3, "fold": 3}, {"folds": 3, "fold": "1"},
                {"folds": 3, "fold": 1, "sed": 2}, [3, 1]):
        with pytest.raises(ConfigError, match="train_holdout"):
            holdout_args(bad)


def _cross_fit_task(tmp_path, runs, **loss):
    from test_iais import _tiny_cfg

    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.data.pipeline import prepare_split

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path / "ce")
    cfg.data.path = str(tmp_path / "data")  # the first stages' data (the same synthetic files)
    cfg.model.args["first_stage"] = str(tmp_path / "full")
    cfg.loss.args.update({"pool": "first_stage", "fusion": 2.0, "negatives": 9,
                          "cross_fit": [str(r) for r in runs], **loss})
    model = create_model(cfg.model)
    task = HardNegativeTask(model, create_loss(cfg.loss.name, **cfg.loss.args))
    split = prepare_split(cfg, model, "train", "en", training=True, progress=False)
    return cfg, task, split


def test_cross_fit_pools_and_scores_come_from_the_held_out_fold(tmp_path):
    from xmodal.eval.encode import embed_split
    from xmodal.models import load
    from xmodal.train.loop import train
    from xmodal.data.pipeline import prepare_split

    data = write_synthetic_precomp(tmp_path / "data")
    (tmp_path / "ce").mkdir()
    train(load_config(write_tiny_config(tmp_path / "full.yaml", data, steps=5)), tmp_path / "full", progress=False)
    runs = []
    for fold in range(2):
        cfg = load_config(write_tiny_config(tmp_path / f"f{fold}.yaml", data, steps=5))
        cfg.data.train_holdout = {"folds": 2, "fold": fold, "seed": 0}
        train(cfg, tmp_path / f"f{fold}", progress=False)
        runs.append(tmp_path / f"f{fold}")
    cfg, task, split = _cross_fit_task(tmp_path, runs)
    task.attach_split(cfg, split)

    gt = split.dataset.gt
    tf, imf = item_folds(gt, 2, 0)
    pos = gt.dense()  # (M, N)
    size = 9
    for fold, run in enumerate(runs):
        dual = load(run)
        img, txt = embed_split(dual.model, prepare_split(dual.config, dual.model, "train", "en", progress=False))
        ti, ii = np.flatnonzero(tf == fold), np.flatnonzero(imf == fold)
        # each fold's rows are its own held-out run's embeddings
        torch.testing.assert_close(task._first["texts"][ti], txt[ti], rtol=0, atol=1e-5)
        torch.testing.assert_close(task._first["images"][ii], img[ii], rtol=0, atol=1e-5)
        sim = (txt @ img.T).numpy()  # (M, N) by this fold's run
        for t in ti:  # brute force: the nearest non-positive images of the same fold
            got = task._neighbours["images"][t]
            assert set(imf[got].tolist()) == {fold} and not pos[t, got].any() and len(set(got.tolist())) == size
            want = np.sort([sim[t, i] for i in ii if not pos[t, i]])[::-1][:size]
            np.testing.assert_allclose(np.sort(sim[t, got])[::-1], want, rtol=0, atol=1e-5)
        for i in ii:
            got = task._neighbours["texts"][i]
            assert set(tf[got].tolist()) == {fold} and not pos[got, i].any()
            want = np.sort([sim[t, i] for t in ti if not pos[t, i]])[::-1][:size]
            np.testing.assert_allclose(np.sort(sim[got, i])[::-1], want, rtol=0, atol=1e-5)
    # a training step runs on the cross-fitted pools and fused scores
    from xmodal.data.inputs import Batch

    ti = np.arange(0, 16, 2)
    losses = task.training_step(Batch(ti, ti // 2, torch.eye(8, dtype=torch.bool), None, None), 0)[0]
    assert all(torch.isfinite(v) for v in losses.values())

    # what the option checks
    with pytest.raises(ConfigError, match="one run per fold of 3"):
        t3 = _cross_fit_task(tmp_path, runs + [runs[0]])
        t3[1].attach_split(t3[0], t3[2])
    with pytest.raises(ConfigError, match="as .*f0 does"):
        t2 = _cross_fit_task(tmp_path, [runs[0], runs[0]])
        t2[1].attach_split(t2[0], t2[2])
    with pytest.raises(ConfigError, match="whole split"):
        t2 = _cross_fit_task(tmp_path, [tmp_path / "full", runs[1]])
        t2[1].attach_split(t2[0], t2[2])
    with pytest.raises(ConfigError, match="not a run folder"):
        t2 = _cross_fit_task(tmp_path, [tmp_path / "nowhere", runs[1]])
        t2[1].attach_split(t2[0], t2[2])
    with pytest.raises(ConfigError, match="pool: first_stage"):
        _cross_fit_task(tmp_path, runs, pool="uniform")
    with pytest.raises(ConfigError, match="2 or more"):
        _cross_fit_task(tmp_path, runs[:1])
