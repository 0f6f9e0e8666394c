"""ALADIN: MrSw by hand, ListNet by formula, loss schedule, golden model, train + two-stage eval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from xmodal.config import load_config
from xmodal.errors import ConfigError
from xmodal.losses import LOSSES, create_loss
from xmodal.losses.distill import AladinLoss, ListNetDistillation, MSEDistillation
from xmodal.models import list_models
from xmodal.models.aladin import (Aladin, AladinMatching, _check_args, load_run, mrsw_pair_scores, mrsw_scores,
                                  skip_tokens)
from xmodal.models.base import EmbeddingScorer, PairScorer, TowerOutput

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "xmodal" / "configs"


# ---------------------------------------------------------------------------------------
# the alignment head's aggregation
# ---------------------------------------------------------------------------------------
def _hand_example():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],     # image 0: r3 is padding
                      [[0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]]])  # image 1
    xm = torch.tensor([[True, True, False], [True, True, True]])
    y = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],     # text 0: w3 is padding
                      [[0.0, -1.0], [-1.0, 0.0], [0.8, 0.6]]])  # text 1
    ym = torch.tensor([[True, True, False], [True, True, True]])
    return x, xm, y, ym


def test_mrsw_hand_computed():
    x, xm, y, ym = _hand_example()
    # image 0 / text 0: w1 max(1, 0) = 1, w2 max(.6, .8) = .8                      -> 1.8
    # image 0 / text 1: w1 max(0, -1) = 0, w2 max(-1, 0) = 0, w3 max(.8, .6) = .8
    #                   (the padded region would give w3 .96)                        -> 0.8
    # image 1 / text 0: w1 max(.6, -1, 0) = .6, w2 max(1, -.6, -.8) = 1              -> 1.6
    # image 1 / text 1: w1 max(-.8, 0, 1) = 1, w2 max(-.6, 1, 0) = 1, w3 max(.96, -.8, -.6) = .96 -> 2.96
    expected = torch.tensor([[1.8, 0.8], [1.6, 2.96]])
    torch.testing.assert_close(mrsw_scores(x, xm, y, ym), expected)
    torch.testing.assert_close(mrsw_scores(x, xm, y, ym, chunk_bytes=1), expected)  # one image per chunk
    pairs = mrsw_pair_scores(x[[0, 0, 1, 1]], xm[[0, 0, 1, 1]], y[[0, 1, 0, 1]], ym[[0, 1, 0, 1]])
    torch.testing.assert_close(pairs, expected.flatten())


def test_mrsw_padding_never_wins_the_max():
    # every real region is anti-aligned with the word; the original's 0-filled padding would make it 0
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    xm = torch.tensor([[True, False]])
    y = torch.tensor([[[-1.0, 0.0]]])
    torch.testing.assert_close(mrsw_scores(x, xm, y, None), torch.tensor([[-1.0]]))


def test_skip_tokens_drops_first_and_last_real_tokens():
    tokens = torch.arange(1.0, 7.0).view(1, 6, 1).repeat(2, 1, 1)  # (2, 6, 1): values 1..6
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    # the original: [CLS] dropped, and the last two real tokens (". [SEP]")
    out, m = skip_tokens(tokens, mask, 1, 2)
    assert m.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert out[..., 0].tolist() == [[2.0, 3.0, 4.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]]
    _, m = skip_tokens(tokens, None, 0, 0)
    assert bool(m.all())


# ---------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------
def _listnet_direct(s, t, ts, tt, eps=1e-10):
    def softmax(v):
        e = [math.exp(a - max(v)) for a in v]
        return [a / sum(e) for a in e]

    rows = [(-sum(p * math.log(q + eps) for p, q in zip(softmax([a * tt for a in t[i]]),
                                                         softmax([a * ts for a in s[i]]))))
            for i in range(len(s))]
    cols_s = [list(c) for c in zip(*s)]
    cols_t = [list(c) for c in zip(*t)]
    cols = [(-sum(p * math.log(q + eps) for p, q in zip(softmax([a * tt for a in cols_t[j]]),
                                                         softmax([a * ts for a in cols_s[j]]))))
            for j in range(len(cols_s))]
    return sum(rows) / len(rows) + sum(cols) / len(cols)


def test_listnet_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, generator=g).tanh()  # student cosines
    t = torch.randn(3, 4, generator=g) * 3  # teacher MrSw sums
    for ts, tt in ((6.0, 1.0), (1.0, 0.5)):
        got = ListNetDistillation(ts, tt)(s, t)
        want = _listnet_direct(s.tolist(), t.tolist(), ts, tt)
        assert float(got) == pytest.approx(want, rel=1e-5)


def test_listnet_is_minimal_when_the_student_matches_the_teacher():
    t = torch.randn(4, 4)
    loss = ListNetDistillation(1.0, 1.0)
    assert float(loss(t, t)) < float(loss(t.flip(0), t))


def test_mse_distillation_formula_and_teacher_is_not_trained():
    s = torch.randn(3, 3, requires_grad=True)
    t = torch.randn(3, 3, requires_grad=True)
    mse = MSEDistillation()
    got = mse(s, t)
    torch.testing.assert_close(got, ((0.5 * s + 0.5 - t) ** 2).mean())
    got.backward()
    assert t.grad is None and s.grad is not None and mse.affine.grad is not None


# ---------------------------------------------------------------------------------------
# the loss combination
# ---------------------------------------------------------------------------------------
def test_aladin_loss_terms_weights_and_delayed_distillation():
    torch.manual_seed(0)
    align = torch.randn(4, 4, requires_grad=True)
    match = torch.randn(4, 4, requires_grad=True)
    hinge = create_loss("hinge", margin=0.2, max_violation=True)
    loss = AladinLoss(terms=["alignment", "distillation"], weights=[1.0, 0.5], activate_distillation_after=10)
    assert loss.needs_alignment and loss.needs_matching
    early = loss.combine(align, match, step=9)
    assert set(early) == {"alignment_loss", "distillation"} and not early["distillation"].requires_grad
    torch.testing.assert_close(early["alignment_loss"], hinge.from_scores(align)["hinge_loss"])
    late = loss.combine(align, match, step=10)
    torch.testing.assert_close(late["distillation_loss"], 0.5 * ListNetDistillation()(match, align))
    late["distillation_loss"].backward()
    assert align.grad is None and match.grad is not None  # the teacher is detached
    # distillation alone is always active (as the original keeps a lone distillation term)
    alone = AladinLoss(terms=["distillation"], activate_distillation_after=100)
    assert not alone.needs_alignment or alone.needs_matching
    assert "distillation_loss" in alone.combine(align, match, step=0)


def test_aladin_loss_config_errors_and_registry():
    assert "aladin" in LOSSES
    with pytest.raises(ConfigError, match="terms"):
        AladinLoss(terms=["alignment", "contrastive"])
    with pytest.raises(ConfigError, match="weights"):
        AladinLoss(terms=["alignment"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="both"):
        AladinLoss(terms=["alignment", "distillation"]).from_scores(torch.randn(2, 2))


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------
def _small_model(cls=Aladin, **kw):
    torch.manual_seed(0)
    args = dict(image_dim=8, text_dim=6, dim=16, depth=1, heads=2, ff_dim=32, dropout=0.0, match_layers=1,
                match_heads=2, grid=[2, 2], align_skip_text=[1, 1])
    args.update(kw)
    return cls(None, None, **args).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    img = TowerOutput(tokens=torch.randn(3, 4, 8, generator=g), pooled=torch.zeros(3, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    txt = TowerOutput(tokens=torch.randn(4, 5, 6, generator=g), pooled=torch.zeros(4, 6), mask=mask)
    return img, txt


def test_golden_small_model():
    model = _small_model()
    img, txt = _inputs()
    with torch.no_grad():
        ir, tr = model.encode_image_reps(img), model.encode_text_reps(txt)
        scores = model.score(ir, tr)
    assert ir.tokens.shape == (3, 4, 16) and tr.tokens.shape == (4, 4, 16)  # [IMG] / [CLS] dropped
    expected = torch.tensor(GOLDEN_SCORES)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ir.pooled.norm(dim=-1), torch.ones(3))


# MrSw of the seed-0 model above on the seed-1 inputs (3 words per caption, 4 cells per image)
GOLDEN_SCORES = [[0.8179, 0.4826, 0.4606, 1.0643], [1.0297, 0.3698, 0.6735, 1.1195], [0.0582, 0.1564, 0.2218, 0.4697]]


def test_score_pairs_and_padding_invariance():
    model = _small_model()
    img, txt = _inputs()
    with torch.no_grad():
        ir, tr = model.encode_image_reps(img), model.encode_text_reps(txt)
        full = model.score(ir, tr)
        ii, tt = torch.tensor([0, 2, 1, 1]), torch.tensor([3, 0, 1, 2])
        torch.testing.assert_close(model.score_pairs(ir, tr, ii, tt), full[ii, tt])
        # text 1 without its padding scores the same
        short = model.encode_text_reps(TowerOutput(tokens=txt.tokens[1:2, :3], pooled=txt.pooled[1:2]))
        torch.testing.assert_close(model.score(ir, short)[:, 0], full[:, 1], rtol=1e-5, atol=1e-5)
        first = model.first_stage_embeddings(ir, tr)
    assert first[0].shape == (3, 16) and first[1].shape == (4, 16)


def test_matching_head_is_an_embedding_scorer_with_the_same_weights():
    align, match = _small_model(), _small_model(AladinMatching)
    assert isinstance(align, PairScorer) and not isinstance(align, EmbeddingScorer)
    assert isinstance(match, EmbeddingScorer)
    assert align.state_dict().keys() == match.state_dict().keys()
    img, txt = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(match.encode_image(img), align.encode_image_reps(img).pooled)
        torch.testing.assert_close(match.encode_text(txt), align.encode_text_reps(txt).pooled)


def test_frozen_backbone_trains_only_the_matching_head():
    model = _small_model(freeze_backbone=True).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"matching"}
    assert not model.backbone.training and model.matching.training


def test_config_checks_and_registration():
    assert "aladin" in list_models()
    with pytest.raises(ConfigError, match="valid keys"):
        _check_args({"nope": 1})
    with pytest.raises(ConfigError, match="eval_head"):
        _check_args({"eval_head": "both"})
    with pytest.raises(ConfigError, match="first, last"):
        _check_args({"align_skip_text": [1]})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("aladin/*.yaml")) + sorted(CONFIGS.glob("emoji/aladin_*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.model.type == "aladin" and cfg.loss.name == "aladin"
    _check_args(cfg.model.args)
    AladinLoss(**cfg.loss.args)


# ---------------------------------------------------------------------------------------
# end to end: train (alignment + distillation), reload with either head, two-stage eval
# ---------------------------------------------------------------------------------------
def _tiny_config(tmp_path: Path, data: Path, name: str, loss: str, extra_args: str = "") -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: aladin-{name}
data: {{format: precomp, path: {data}, train_split: train, val_split: dev, test_split: test}}
model:
  type: aladin
  image: {{name: features, args: {{in_dim: 16}}, frozen: true}}
  text: {{name: bigru, args: {{word_dim: 16, out_dim: 32}}, frozen: false}}
  args: {{dim: 32, depth: 1, heads: 2, ff_dim: 64, dropout: 0.0, box_dim: 0, match_layers: 1, match_heads: 2,
          align_skip_image: [1, 0], align_skip_text: [0, 0]{extra_args}}}
loss: {loss}
optim: {{name: adam, lr: 0.003, schedule: cosine, warmup_steps: 5}}
train: {{steps: 120, batch_size: 32, eval_every: 60, log_every: 10, tensorboard: false}}
""")
    return cfg


def test_train_and_two_stage_evaluation(tmp_path, capsys):
    from train_fixtures import write_synthetic_precomp
    from xmodal.cli import main
    from xmodal.eval.encode import evaluate_split
    from xmodal.data.pipeline import prepare_split

    data = write_synthetic_precomp(tmp_path / "precomp")
    joint = _tiny_config(tmp_path, data, "joint", "{name: aladin, args: {terms: [alignment, distillation], "
                                                  "activate_distillation_after: 20}}")
    run = tmp_path / "joint"
    assert main(["train", str(joint), "--out", str(run), "--no-progress"]) == 0
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if r["kind"] == "train"]
    assert "distillation" in train_logs[0] and "distillation_loss" not in train_logs[0]  # step 10: not yet
    assert "distillation_loss" in train_logs[-1]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    # 40 test images, 80 captions: chance rsum is about 90
    assert exact["rsum"] > 220, exact
    assert main(["eval", str(run), "--json", "--rerank-k", "80"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(exact)  # k >= all images and texts: exact
    assert main(["eval", str(run), "--json", "--rerank-k", "3"]) == 0
    two_stage = json.loads(capsys.readouterr().out)
    # the distilled matching head alone, as an embedding scorer
    matching_run = load_run(run, eval_head="matching")
    matching = matching_run.model
    assert isinstance(matching, AladinMatching) and matching_run.kind == "embedding"
    split = prepare_split(matching_run.config, matching, "test", None, progress=False)
    fast = evaluate_split(matching, split)["metrics"]
    print("exact", exact["rsum"], "two-stage k=3", two_stage["rsum"], "matching", fast["rsum"])
    assert fast["rsum"] > 100  # above chance: the head learnt from the alignment scores
    # re-ranking the top 3 keeps R@5 / R@10 of the first stage and improves its R@1
    assert two_stage["t2i_r10"] == pytest.approx(fast["t2i_r10"])
    assert two_stage["i2t_r5"] == pytest.approx(fast["i2t_r5"])
    assert two_stage["t2i_r1"] + two_stage["i2t_r1"] > fast["t2i_r1"] + fast["i2t_r1"]

    # matching-distill-finetune from the joint run: frozen backbone, exact scores unchanged
    ft = _tiny_config(tmp_path, data, "ft", "{name: aladin, args: {terms: [distillation]}}",
                      f", freeze_backbone: true, init_from: {run}, eval_head: matching")
    ft_run = tmp_path / "ft"
    assert main(["train", str(ft), "--out", str(ft_run), "--no-progress", "train.steps=20", "train.eval_every=20"]) == 0
    a, b = load_run(run, eval_head="alignment").model, load_run(ft_run, eval_head="alignment").model
    for k, v in a.state_dict().items():
        if not k.startswith(("matching.", "text_tower.")):
            torch.testing.assert_close(b.state_dict()[k], v, msg=k)


def test_backbone_initialised_from_a_bert_checkpoint():
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.models import create_model

    cfg = ModelConfig(type="aladin", image=TowerConfig("features", {"in_dim": 8}), text=TowerConfig("hf", {}),
                      args={"text_init": "minilm", "box_dim": 0, "match_layers": 1, "dropout": 0.0})
    model = create_model(cfg).eval()
    assert model.text_tower is None and model.image_tower is None  # raw captions, region rows
    assert model.backbone.depth == 6 and model.dim == 384
    with torch.no_grad():
        txt = model.encode_text_reps(["a grinning face.", "red heart"])
        img = model.encode_image_reps(torch.randn(3, 4, 8))
        scores = model.score(img, txt)
    # [CLS] and the last two tokens (". [SEP]" / "heart [SEP]") are not aligned
    assert txt.mask.sum(1).tolist() == [3, 1]
    assert scores.shape == (3, 2) and img.pooled.shape == (3, 384)
    with pytest.raises(ConfigError, match="text_init"):
        create_model(ModelConfig(type="aladin", image=cfg.image, args={"text_init": "minilm", "dim": 64}))
