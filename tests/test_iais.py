"""IAIS: relation alignment (singular / distributed) vs hand-built maps and the original's
per-pair code, symmetric KL, the TSA schedule, hard-negative sampling and selection, the
cross-encoder's pair scoring (golden values, padding, score vs score_pairs), and a tiny
end-to-end train + two-stage evaluation."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.losses.relation import (IaisLoss, distributed_alignment, ranking_hinge, relation_maps,
                                    singular_alignment, symmetric_kl, tsa_threshold)
from xmodal.train.tasks.hard_negatives import hardest, sample_negatives

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import write_synthetic_precomp, write_tiny_config  # noqa: E402


# ------------------------------------------------------------------------------------------
# references written as the original (lancopku/IAIS model/model.py), one pair at a time
# ------------------------------------------------------------------------------------------
_KL = nn.KLDivLoss(reduction="batchmean")


def ref_distributed(txt, img, t2i, i2t, modal):
    if modal == "L":
        pseudo = t2i @ i2t
        return _KL(torch.log(txt + 1e-6), pseudo) + _KL(torch.log(pseudo + 1e-6), txt)
    pseudo = i2t @ t2i
    return _KL(torch.log(img + 1e-6), pseudo) + _KL(torch.log(pseudo + 1e-6), img)


def ref_singular(txt, img, cross, length, modal):
    index = cross.argmax(-1).tolist()
    rows = [[i] * length for i in index]
    cols = [index] * length
    if modal == "L":
        pseudo = nn.Softmax(dim=-1)(img[rows, cols])
        return _KL(txt.log(), pseudo) + _KL(pseudo.log(), txt)
    pseudo = nn.Softmax(dim=-1)(txt[rows, cols])
    return _KL(img.log(), pseudo) + _KL(pseudo.log(), img)


def _rand_rows(*shape, gen):
    return torch.softmax(torch.randn(*shape, generator=gen) * 2, dim=-1)


# ------------------------------------------------------------------------------------------
# TSA, KL, hinge
# ------------------------------------------------------------------------------------------
def test_tsa_schedule_values():
    assert tsa_threshold("exp", 0, 100) == pytest.approx(math.exp(-5))
    assert tsa_threshold("exp", 50, 100) == pytest.approx(math.exp(-2.5))
    assert tsa_threshold("exp", 100, 100) == pytest.approx(1.0)
    assert tsa_threshold("linear", 25, 100) == pytest.approx(0.25)
    assert tsa_threshold("log", 100, 100) == pytest.approx(1 - math.exp(-5))
    assert tsa_threshold("constant", 3, 100) == 1.0


def test_symmetric_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    want = (kl([0.25, 0.75], [0.5, 0.5]) + kl([0.5, 0.5], [0.9, 0.1])
            + kl([0.5, 0.5], [0.25, 0.75]) + kl([0.9, 0.1], [0.5, 0.5])) / 2  # batchmean over 2 rows
    got = symmetric_kl(p, q, mask, plain_log=True)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert symmetric_kl(p, p, mask, plain_log=True).item() == pytest.approx(0.0, abs=1e-7)
    # padded items are ignored: same value with a third, masked item of garbage
    p3 = torch.zeros(1, 3, 3)
    q3 = torch.full((1, 3, 3), 0.3)
    p3[:, :2, :2], q3[:, :2, :2] = p, q
    m3 = torch.tensor([[True, True, False]])
    assert symmetric_kl(p3, q3, m3, plain_log=True).item() == pytest.approx(want, rel=1e-5)


def test_ranking_hinge_on_sigmoids():
    pos = torch.tensor([0.0, 2.0])
    neg = torch.tensor([[0.0, -5.0], [2.0, 3.0]])
    s = torch.sigmoid
    want = np.mean([0.2, max(0, 0.2 + s(torch.tensor(-5.0)).item() - 0.5),
                    0.2, 0.2 + s(torch.tensor(3.0)).item() - s(torch.tensor(2.0)).item()])
    assert ranking_hinge(pos, neg, 0.2).item() == pytest.approx(want, rel=1e-6)


def test_warm_start_losses_by_hand():
    """``warmup_loss``: UNITER's ITM binary cross-entropy, or the positive's cross-entropy among
    its candidates, during the random-negative steps only; the hinge after."""
    from xmodal.losses.relation import itm_bce, itm_softmax

    pos = torch.tensor([1.0, -0.5])
    neg = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 softplus
    want_bce = 0.5 * (np.mean([sp(-1.0), sp(0.5)]) + np.mean([sp(0.0), sp(2.0), sp(-1.0), sp(0.5)]))
    assert itm_bce(pos, neg).item() == pytest.approx(want_bce, rel=1e-6)
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    want_sm = np.mean([lse([1.0, 0.0, 2.0]) - 1.0, lse([-0.5, -1.0, 0.5]) + 0.5])
    assert itm_softmax(pos, neg).item() == pytest.approx(want_sm, rel=1e-6)
    loss = IaisLoss(random_steps=3, warmup_loss="itm")
    assert loss.combine(pos, neg, None, "V", 2, 10)["rank_loss"].item() == pytest.approx(want_bce, rel=1e-6)
    assert loss.combine(pos, neg, None, "V", 3, 10)["rank_loss"].item() == pytest.approx(
        ranking_hinge(pos, neg, 0.2).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="warmup_loss"):
        IaisLoss(warmup_loss="bce")


# ------------------------------------------------------------------------------------------
# attention maps and the two alignments
# ------------------------------------------------------------------------------------------
def test_relation_maps_blocks_by_hand():
    # text: [CLS] w1 w2 [SEP] (L = 4), regions r1 r2; one head, logits built by hand
    L, R = 4, 2
    logits = torch.zeros(1, 1, L + R, L + R)
    logits[0, 0, 1, 2] = math.log(3.0)  # w1 attends w2 three times as much as w1 (words only)
    logits[0, 0, 1, 0] = 50.0  # [CLS] is not a key of the word block: ignored
    logits[0, 0, 1, 5] = math.log(4.0)  # w1 -> r2 four times r1
    logits[0, 0, 4, 1] = math.log(9.0)  # r1 -> w1 nine times w2
    words = torch.tensor([[False, True, True, False]])
    regions = torch.tensor([[True, True]])
    m = relation_maps(logits, L, words, regions)
    assert torch.allclose(m["ww"][0, 1, 1:3], torch.tensor([0.25, 0.75]))
    assert torch.allclose(m["ww"][0, 0], torch.zeros(L)) and torch.allclose(m["ww"][0, 3], torch.zeros(L))
    assert torch.allclose(m["wr"][0, 1], torch.tensor([0.2, 0.8]))
    assert torch.allclose(m["rw"][0, 0], torch.tensor([0.0, 0.9, 0.1, 0.0]))
    assert torch.allclose(m["rr"][0], torch.full((2, 2), 0.5))
    # heads are averaged after the softmax
    two = torch.cat([logits, torch.zeros_like(logits)], dim=1)
    assert torch.allclose(relation_maps(two, L, words, regions)["wr"][0, 1], torch.tensor([0.35, 0.65]))


def _maps(ww, rr, wr, rw):
    L, R = ww.shape[-1], rr.shape[-1]
    return {"ww": ww[None], "rr": rr[None], "wr": wr[None], "rw": rw[None],
            "word_mask": torch.ones(1, L, dtype=torch.bool), "region_mask": torch.ones(1, R, dtype=torch.bool)}


def test_distributed_alignment_hand_built():
    ww = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    rr = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    wr = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # word i looks at region i only
    rw = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    m = _maps(ww, rr, wr, rw)
    # L: induced word relation wr @ rw = uniform = ww -> no loss
    assert distributed_alignment(m, "L").item() == pytest.approx(0.0, abs=1e-5)
    # V: induced region relation rw @ wr = uniform vs identity: both KLs by hand (eps in the logs)
    eps = 1e-6
    kl_induced_own = 0.5 * (math.log(0.5) - math.log(1 + eps)) + 0.5 * (math.log(0.5) - math.log(0 + eps))  # a row
    kl_own_induced = 1.0 * (math.log(1.0) - math.log(0.5 + eps))  # a row (0 log 0 = 0)
    want = (2 * kl_induced_own + 2 * kl_own_induced) / 2  # two rows each, batchmean over 2 rows
    assert distributed_alignment(m, "V").item() == pytest.approx(want, rel=1e-5)


def test_singular_alignment_hand_built():
    ww = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    rr = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    wr = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])  # words -> regions 0, 1, 0
    rw = torch.tensor([[0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])  # regions -> words 2, 0
    m = _maps(ww, rr, wr, rw)
    idx = [0, 1, 0]
    induced = torch.softmax(torch.tensor([[rr[a, b].item() for b in idx] for a in idx]), dim=-1)
    kl = lambda p, q: float((p * (p / q).log()).sum())  # noqa: E731
    want = (kl(induced, ww) + kl(ww, induced)) / 3
    assert singular_alignment(m, "L").item() == pytest.approx(want, rel=1e-5)
    idx = [2, 0]
    induced = torch.softmax(torch.tensor([[ww[a, b].item() for b in idx] for a in idx]), dim=-1)
    want = (kl(induced, rr) + kl(rr, induced)) / 2
    assert singular_alignment(m, "V").item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("variant", ["singular", "distributed"])
def test_alignments_match_the_original_per_pair(variant):
    """Batched, padded maps give the original's per-pair losses (sliced to each pair's length)."""
    gen = torch.Generator().manual_seed(0)
    B, L, R, H = 3, 6, 5, 2
    logits = torch.randn(B, H, L + R, L + R, generator=gen) * 2
    lengths, nbbs = [4, 6, 3], [5, 2, 4]  # tokens incl. [CLS]/[SEP]; regions
    words = torch.zeros(B, L, dtype=torch.bool)
    regions = torch.zeros(B, R, dtype=torch.bool)
    for b, (n, r) in enumerate(zip(lengths, nbbs)):
        words[b, 1:n - 1] = True
        regions[b, :r] = True
    m = relation_maps(logits, L, words, regions)
    for modal in ("L", "V"):
        got = (singular_alignment(m, modal) if variant == "singular" else distributed_alignment(m, modal))
        for b, (n, r) in enumerate(zip(lengths, nbbs)):
            w = slice(1, n - 1)
            txt, img = m["ww"][b, w, w], m["rr"][b, :r, :r]
            t2i, i2t = m["wr"][b, w, :r], m["rw"][b, :r, w]
            if variant == "singular":
                cross, length = (t2i, n - 2) if modal == "L" else (i2t, r)
                want = ref_singular(txt, img, cross, length, modal)
            else:
                want = ref_distributed(txt, img, t2i, i2t, modal)
            assert got[b].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6), (modal, b)


def test_iais_loss_terms_and_schedule():
    gen = torch.Generator().manual_seed(1)
    loss = IaisLoss(alignment="distributed", weight=2.0, reduction="sum")
    logits = torch.randn(2, 1, 7, 7, generator=gen)
    m = relation_maps(logits, 3, torch.tensor([[False, True, False]] * 2), torch.ones(2, 4, dtype=torch.bool))
    out = loss.combine(torch.zeros(2), torch.zeros(2, 3), m, "V", step=50, total=100)
    per_pair = distributed_alignment(m, "V")
    assert out["iais_loss"].item() == pytest.approx(2.0 * math.exp(-2.5) * per_pair.sum().item(), rel=1e-6)
    assert out["rank_loss"].item() == pytest.approx(0.2)
    assert "iais_loss" not in IaisLoss(alignment="none").combine(torch.zeros(2), torch.zeros(2, 3), m, "V", 0, 10)


# ------------------------------------------------------------------------------------------
# hard negatives
# ------------------------------------------------------------------------------------------
def test_sample_negatives_avoids_positives():
    rng = np.random.default_rng(0)
    pos = np.array([3, 7, 8])
    seen = np.zeros(12, dtype=int)
    for _ in range(300):
        neg = sample_negatives(12, pos, 5, rng)
        assert len(set(neg.tolist())) == 5 and not set(neg.tolist()) & set(pos.tolist())
        assert neg.min() >= 0 and neg.max() < 12
        seen[neg] += 1
    assert (seen[[0, 1, 2, 4, 5, 6, 9, 10, 11]] > 100).all()  # every non-positive is drawn
    with pytest.raises(Exception):
        sample_negatives(5, pos, 3, rng)


def test_hardest_keeps_the_k_highest():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, -1.0, 4.0, 0.0, 3.0]])
    got = hardest(scores, 2)
    assert [sorted(r) for r in got.tolist()] == [[1, 3], [0, 2]]


# ------------------------------------------------------------------------------------------
# the cross-encoder
# ------------------------------------------------------------------------------------------
def _tiny_cfg(tmp: Path, alignment: str = "distributed", steps: int = 60, extra: str = "", random_steps: int = 0):
    from xmodal.config import load_config

    data = write_synthetic_precomp(tmp / "data")
    text = f"""
name: tiny-iais
data: {{format: precomp, path: {data}, train_split: train, val_split: dev, test_split: test}}
model:
  type: cross_encoder
  image: {{name: features, args: {{in_dim: 16, out_dim: 32}}, frozen: false}}
  args: {{text_init_weights: false, dim: 32, depth: 2, heads: 4, ff_dim: 64, box_dim: 0, pair_batch: 128,
          dropout: 0.0, init_std: 0.15}}
loss: {{name: iais, args: {{negatives: 15, hard_negatives: 3, alignment: {alignment}, random_steps: {random_steps}}}}}
optim: {{name: adamw, lr: 0.002, schedule: cosine, warmup_steps: 5}}
train: {{steps: {steps}, batch_size: 8, eval_every: 0, log_every: 10, tensorboard: false}}
{extra}
"""
    (tmp / "iais.yaml").write_text(text)
    return load_config(tmp / "iais.yaml"), data


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from xmodal.models import create_model

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path_factory.mktemp("m"))
    return create_model(cfg.model).eval()


def test_golden_scores_and_padding(tiny_model):
    m = tiny_model
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 16, generator=gen)
    with torch.inference_mode():
        img = m.encode_image_reps(feats)
        txt = m.encode_text_reps(["a red circle", "star that is blue and very shiny"])
        full = m.score(img, txt)  # (2, 2), the second caption pads the first
        alone = m.score(img, m.encode_text_reps(["a red circle"]))
        pairs = m.score_pairs(img, txt, torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]))
    assert full.shape == (2, 2)
    assert torch.allclose(full[:, :1], alone, atol=1e-5)
    assert torch.allclose(pairs, torch.stack([full[1, 0], full[0, 1], full[1, 1]]), atol=1e-5)
    # regression values of this seeded random model (init_std 0.15: the pairs' scores differ)
    golden = torch.tensor([[0.31172025, 0.33694905], [0.37957981, 0.37320673]])
    assert torch.allclose(full, golden, rtol=0, atol=5e-6), full


def test_selection_keeps_the_pools_hardest(tmp_path):
    """The task's graded negatives are the k best-scored of the pool it scored without grad."""
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.data.inputs import Batch
    from xmodal.data.pipeline import prepare_split

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path)
    model = create_model(cfg.model)
    task = HardNegativeTask(model, create_loss(cfg.loss.name, **cfg.loss.args))
    split = prepare_split(cfg, model, "train", "en", training=True, progress=False)
    task.attach_split(cfg, split)
    calls = []
    orig = model.forward_pairs

    def spy(img, txt, relation_rows=None):
        out = orig(img, txt, relation_rows)
        calls.append((torch.is_grad_enabled(), out[0].detach().clone()))
        return out

    model.forward_pairs = spy
    text_idx = np.arange(0, 16, 2)
    batch = Batch(text_idx, text_idx // 2, torch.eye(8, dtype=torch.bool), None, None)
    for step, k in ((0, 3), (1, 3)):
        calls.clear()
        task.training_step(batch, step)
        pool = torch.cat([c[1] for c in calls if not c[0]]).view(8, 16)  # (B, 1 + pool)
        graded = calls[-1][1].view(8, 1 + k)
        assert calls[-1][0]
        assert torch.allclose(graded[:, 0], pool[:, 0], atol=1e-5)  # the positive first
        want = pool[:, 1:].topk(k, dim=1).values
        assert torch.allclose(graded[:, 1:].sort(1, descending=True).values, want, atol=1e-5)


def test_tiny_end_to_end_train_and_two_stage(tmp_path):
    from xmodal.eval.encode import evaluate_split, first_stage_for
    from xmodal.models import load
    from xmodal.train.loop import train
    from xmodal.data.pipeline import prepare_split
    from xmodal.config import load_config

    # a first stage: the tiny dual encoder of the training tests
    data = write_synthetic_precomp(tmp_path / "data")
    dual_cfg = load_config(write_tiny_config(tmp_path / "dual.yaml", data, steps=60))
    train(dual_cfg, tmp_path / "dual", progress=False)
    cfg, _ = _tiny_cfg(tmp_path, alignment="singular", steps=40,
                       extra="eval: {rerank_k: 10}")
    cfg.model.args["first_stage"] = str(tmp_path / "dual")
    summary = train(cfg, tmp_path / "ce", progress=False)
    logs = (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()
    assert any('"iais_loss"' in line for line in logs)
    assert summary["best_val"]["rsum"] > 0
    ce_run, dual_run = load(tmp_path / "ce"), load(tmp_path / "dual")
    ce, dual = ce_run.model, dual_run.model
    assert ce.first_stage is not None  # rebuilt from its run folder, not saved in the checkpoint
    split = prepare_split(ce_run.config, ce, "test", "en", progress=False)
    first = first_stage_for(dual, prepare_split(dual_run.config, dual, "test", "en", progress=False), split)
    two = evaluate_split(ce, split, rerank_k=5, first_stage=first)["metrics"]
    n = split.dataset.num_texts
    exact_k = evaluate_split(ce, split, rerank_k=n, first_stage=first)["metrics"]
    exact = evaluate_split(ce, split, rerank_k=0)["metrics"]
    assert exact_k == pytest.approx(exact)  # k >= candidates: two-stage is exact
    assert two["rsum"] > 0
    # the CLI path: xmodal eval RUN --first-stage DUAL --rerank-k K
    out = subprocess.run([sys.executable, "-m", "xmodal", "eval", str(tmp_path / "ce"), "--first-stage",
                          str(tmp_path / "dual"), "--rerank-k", "5", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(two)
    shutil.rmtree(tmp_path / "ce")


def test_fits_a_fixed_batch(tmp_path):
    """Gradients reach every part: on one repeated batch the positives overtake their hard negatives."""
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.data.inputs import Batch
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.data.pipeline import prepare_split

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path, alignment="distributed")
    m = create_model(cfg.model)
    task = HardNegativeTask(m, create_loss(cfg.loss.name, **cfg.loss.args))
    task.attach_split(cfg, prepare_split(cfg, m, "train", "en", training=True, progress=False))
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    ti = np.arange(0, 16, 2)
    batch = Batch(ti, ti // 2, torch.eye(8, dtype=torch.bool), None, None)
    first = None
    for step in range(70):
        losses, metrics = task.training_step(batch, step)
        total = sum(losses.values())
        first = float(losses["rank_loss"].detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    assert float(losses["rank_loss"].detach()) < first - 0.02
    assert metrics["pos_prob"] > metrics["hard_neg_prob"]


def test_tiny_cross_encoder_learns_in_the_loop(tmp_path):
    """Random-negative warm start, then hardest negatives: exact test recall far above chance.

    Chance on the 40-image / 80-caption test split is rsum ~78 (R@1/5/10 ~ 2.5/12.5/25 both
    ways); without the warm start (``random_steps: 0``) the random model collapses to a
    pair-independent score and stays there.
    """
    from xmodal.eval.encode import evaluate_split
    from xmodal.models import load
    from xmodal.train.loop import train
    from xmodal.data.pipeline import prepare_split

    cfg, _ = _tiny_cfg(tmp_path, alignment="none", steps=150, random_steps=100, extra="eval: {rerank_k: 0}")
    train(cfg, tmp_path / "ce", progress=False)
    ce = load(tmp_path / "ce")
    m = evaluate_split(ce.model, prepare_split(ce.config, ce.model, "test", "en", progress=False), rerank_k=0)["metrics"]
    assert m["rsum"] > 160, m  # seed 0 reaches ~340; twice chance leaves room for platform noise


def test_param_groups_scale_the_new_parts(tmp_path):
    """``new_lr_scale``: the loop's groups cover every trainable parameter once, new parts scaled."""
    from xmodal.models import create_model
    from xmodal.train.loop import param_groups

    cfg, _ = _tiny_cfg(tmp_path)
    cfg.model.args["new_lr_scale"] = 10
    m = create_model(cfg.model)
    params = [p for p in m.parameters() if p.requires_grad]
    groups = param_groups(m, params, cfg)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)
    scaled = {id(p) for g in groups if g["lr_scale"] == 10.0 for p in g["params"]}
    new = [m.image_embed, m.rank_output, m.pooler]  # a random model: the pooler is new too
    assert scaled == {id(p) for mod in new for p in mod.parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 10.0]
    cfg.model.args["new_lr_scale"] = 1  # the default: one group, as before the hook
    m1 = create_model(cfg.model)
    assert len(param_groups(m1, [p for p in m1.parameters() if p.requires_grad], cfg)) == 1


def test_random_warm_start_skips_mining_and_alignment(tmp_path):
    """Before ``random_steps``: no pool scoring, the pool's first k negatives, no IAIS term."""
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.data.inputs import Batch
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.data.pipeline import prepare_split

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path, alignment="singular", random_steps=2)
    model = create_model(cfg.model)
    task = HardNegativeTask(model, create_loss(cfg.loss.name, **cfg.loss.args))
    task.attach_split(cfg, prepare_split(cfg, model, "train", "en", training=True, progress=False))
    calls = []
    orig = model.forward_pairs

    def spy(img, txt, relation_rows=None):
        calls.append((torch.is_grad_enabled(), relation_rows is not None))
        return orig(img, txt, relation_rows)

    embedded = []
    orig_images = model.embed_images
    model.embed_images = lambda x: (embedded.append(orig_images(x).tokens.shape[0]), orig_images(x))[1]
    model.forward_pairs = spy
    ti = np.arange(0, 16, 2)
    batch = Batch(ti, ti // 2, torch.eye(8, dtype=torch.bool), None, None)
    for step, warm in ((1, True), (2, False)):
        calls.clear()
        terms, _ = task.training_step(batch, step)
        assert ("iais_loss" in terms) is not warm
        assert any(not grad for grad, _ in calls) is not warm  # the pool is scored only after
        assert calls[-1] == (True, not warm)
    # step 1 (image negatives, warm): only the positives and the pool's first k are embedded
    pools = task._pools(batch, "images", np.random.default_rng([0, 1, 0x49_41_49_53, 1]))
    k = cfg.loss.args["hard_negatives"]
    assert embedded[0] == len(np.unique(pools[:, :1 + k])) < len(np.unique(pools))


def test_first_stage_pool_is_its_nearest_non_positives(tmp_path):
    """``pool: first_stage``: after the warm start, each anchor's pool is its nearest
    non-positives by the first stage, checked against brute force over the whole split."""
    from xmodal.config import load_config
    from xmodal.eval.encode import embed_split
    from xmodal.losses import create_loss
    from xmodal.models import create_model, load
    from xmodal.data.inputs import Batch
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.train.loop import train
    from xmodal.data.pipeline import prepare_split

    data = write_synthetic_precomp(tmp_path / "data")
    train(load_config(write_tiny_config(tmp_path / "dual.yaml", data, steps=5, extra="")), tmp_path / "dual",
          progress=False)
    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path, random_steps=2)
    cfg.model.args["first_stage"] = str(tmp_path / "dual")
    cfg.loss.args["pool"] = "first_stage"
    model = create_model(cfg.model)
    task = HardNegativeTask(model, create_loss(cfg.loss.name, **cfg.loss.args))
    split = prepare_split(cfg, model, "train", "en", training=True, progress=False)
    task.attach_split(cfg, split)

    dual = load(tmp_path / "dual")
    img, txt = embed_split(dual.model, prepare_split(dual.config, dual.model, "train", "en", progress=False))
    sim = (img @ txt.T).numpy()  # (N, M)
    pos = split.dataset.gt.dense().T  # (N, M) image i is a positive of text t
    size = cfg.loss.args["negatives"]
    # (compared by similarity: the synthetic data repeats captions, so equal scores may swap)
    for t in range(sim.shape[1]):
        got = task._neighbours["images"][t]
        want = np.sort([sim[i, t] for i in np.argsort(-sim[:, t], kind="stable") if not pos[i, t]][:size])
        assert not pos[got, t].any() and len(set(got.tolist())) == size
        np.testing.assert_allclose(np.sort(sim[got, t]), want, rtol=0, atol=1e-5)
    for i in range(sim.shape[0]):
        got = task._neighbours["texts"][i]
        want = np.sort([sim[i, t] for t in np.argsort(-sim[i], kind="stable") if not pos[i, t]][:size])
        assert not pos[i, got].any() and len(set(got.tolist())) == size
        np.testing.assert_allclose(np.sort(sim[i, got]), want, rtol=0, atol=1e-5)

    ti = np.arange(0, 16, 2)
    batch = Batch(ti, ti // 2, torch.eye(8, dtype=torch.bool), None, None)
    pools = task._pools(batch, "images", np.random.default_rng(0))
    np.testing.assert_array_equal(pools[:, 0], ti // 2)  # the positive first
    np.testing.assert_array_equal(pools[:, 1:], task._neighbours["images"][ti])
    # the warm start (step < random_steps) keeps k of the neighbours at random, then the hardest
    graded = []
    orig = model.forward_pairs
    model.forward_pairs = lambda img, txt, relation_rows=None: (graded.append(torch.is_grad_enabled()),
                                                                orig(img, txt, relation_rows))[1]
    task.training_step(batch, 1)
    assert graded == [True]  # no pool scoring during the warm start
    graded.clear()
    task.training_step(batch, 2)
    assert graded[0] is False and graded[-1] is True
    # without a first stage the option says what is missing
    cfg.model.args["first_stage"] = None
    bare = HardNegativeTask(create_model(cfg.model), create_loss(cfg.loss.name, **cfg.loss.args))
    with pytest.raises(ConfigError, match="first_stage"):
        bare.attach_split(cfg, split)


def test_init_from_starts_from_a_finished_run(tmp_path):
    """``model.args.init_from``: fine-tuning starts from another run's weights (as IAIS from UNITER)."""
    from xmodal.models import create_model, load
    from xmodal.train.loop import train

    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path, steps=3, random_steps=3)
    train(cfg, tmp_path / "warm", progress=False)
    warm = load(tmp_path / "warm").model
    torch.manual_seed(1)
    cfg.model.args["init_from"] = str(tmp_path / "warm")
    fresh = create_model(cfg.model)
    before = fresh.rank_output.weight.detach().clone()
    fresh.prepare_training(cfg, tmp_path / "ft")
    assert not torch.equal(before, warm.rank_output.weight)
    for key, value in warm.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    cfg.model.args["init_from"] = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="init_from"):
        create_model(cfg.model).prepare_training(cfg, tmp_path / "ft2")


def test_text_layers_read_the_text_alone_and_stay_frozen(tmp_path):
    """``text_layers: k``: MiniLM's first k layers over the text alone (its hidden state k,
    checked against transformers), frozen; the joint encoder is its next ``layers``."""
    from transformers import AutoModel

    from xmodal.models import create_model
    from xmodal.models.transformer import load_bert

    cfg, _ = _tiny_cfg(tmp_path)
    cfg.model.args = {"text_init": "minilm", "text_layers": 4, "layers": 1, "box_dim": 0, "pooling": "mean",
                      "dropout": 0.0}
    cfg.model.image.args["out_dim"] = 384
    m = create_model(cfg.model).train()
    assert len(m.text_layers) == 4 and len(m.encoder.layers) == 1
    assert not any(p.requires_grad for p in m.text_layers.parameters())
    assert not m.text_layers.training  # frozen layers run without dropout in training too
    ref = AutoModel.from_pretrained(load_bert("minilm")["path"], local_files_only=True).eval()
    texts = ["a grinning face", "red heart on a white background"]
    batch = m.tokenize(texts)
    with torch.no_grad():
        want = ref(**batch, output_hidden_states=True).hidden_states
        m.eval()
        got = m.embed_texts(texts)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got.tokens[mask], want[4][mask], rtol=1e-4, atol=1e-4)
    # the joint layer is the checkpoint's fifth: on the text alone it gives hidden state 5
    with torch.no_grad():
        x, _ = m.encoder.layers[0](got.tokens, mask)
    torch.testing.assert_close(x[mask], want[5][mask], rtol=1e-4, atol=1e-4)
    for bad in ({"text_layers": 6}, {"text_layers": 4, "layers": 3}):
        cfg.model.args = {"text_init": "minilm", "box_dim": 0, **bad}
        with pytest.raises(ConfigError, match="layers"):
            create_model(cfg.model)


def test_fused_training_score_adds_the_centred_first_stage(tmp_path):
    """``fusion: w``: pools are mined and graded by pair logit + w x (first-stage score - the
    pool's mean), the order ``eval.rerank_fusion: w`` re-ranks with."""
    from xmodal.config import load_config
    from xmodal.losses import create_loss
    from xmodal.models import create_model
    from xmodal.data.inputs import Batch
    from xmodal.train.tasks.hard_negatives import HardNegativeTask
    from xmodal.train.loop import train
    from xmodal.data.pipeline import prepare_split

    data = write_synthetic_precomp(tmp_path / "data")
    train(load_config(write_tiny_config(tmp_path / "dual.yaml", data, steps=5)), tmp_path / "dual", progress=False)
    torch.manual_seed(0)
    cfg, _ = _tiny_cfg(tmp_path)
    cfg.model.args["first_stage"] = str(tmp_path / "dual")
    cfg.loss.args.update(pool="first_stage", fusion=2.0)
    model = create_model(cfg.model)
    task = HardNegativeTask(model, create_loss(cfg.loss.name, **cfg.loss.args))
    task.attach_split(cfg, prepare_split(cfg, model, "train", "en", training=True, progress=False))
    calls, seen = [], {}
    orig = model.forward_pairs

    def spy(img, txt, relation_rows=None):
        out = orig(img, txt, relation_rows)
        calls.append((torch.is_grad_enabled(), out[0].detach().clone()))
        return out

    def combine(pos, neg, *rest):
        seen.update(pos=pos.detach(), neg=neg.detach())
        return IaisLoss.combine(task.loss, pos, neg, *rest)

    model.forward_pairs, task.loss.combine = spy, combine
    ti = np.arange(0, 16, 2)
    batch = Batch(ti, ti // 2, torch.eye(8, dtype=torch.bool), None, None)
    task._direction(batch, "images", step=0)
    pools = task._pools(batch, "images", np.random.default_rng(0))  # (B, C) no draw: first-stage pools
    sims = (task._first["images"][pools] @ task._first["texts"][ti][:, :, None]).squeeze(-1)  # (B, C)
    base = 2.0 * (sims - sims.mean(1, keepdim=True))
    k = cfg.loss.args["hard_negatives"]
    fused_pool = torch.cat([c[1] for c in calls if not c[0]]).view(len(ti), -1) + base  # (B, C)
    graded = calls[-1][1].view(len(ti), 1 + k)
    torch.testing.assert_close(seen["pos"], graded[:, 0] + base[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["neg"].sort(1).values, fused_pool[:, 1:].topk(k, dim=1).values.sort(1).values,
                               rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="fusion"):
        IaisLoss(fusion=-1.0)
