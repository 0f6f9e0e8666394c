"""Losses: registry contract (forward + backward) and hand-computed golden values."""
from __future__ import annotations

import math

import pytest
import torch

from xmodal.errors import XmodalError
from xmodal.losses import LOSSES, create_loss, list_losses

# image 0 has texts 0 and 1, image 1 has text 2
MULTI_POS = torch.tensor([[True, True, False], [False, False, True]])


def approx(x: torch.Tensor | float, expected: float, tol: float = 1e-5) -> bool:
    value = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    return abs(value - expected) < tol


def test_registry() -> None:
    assert set(list_losses()) >= {"hinge", "adapt_hinge", "infonce", "siglip", "triplet"}
    with pytest.raises(XmodalError, match="infonce"):
        create_loss("nope")


# ---------------------------------------------------------------- contract (every registered loss)
# that scores embedding batches; a loss made for one model's own task (``embedding_loss = False``,
# e.g. IAIS's ranking + relation alignment of a cross-encoder) is tested with that model
EMBEDDING_LOSSES = [n for n in LOSSES.names() if getattr(LOSSES.get(n), "embedding_loss", True)]


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
@pytest.mark.parametrize("multi", [False, True], ids=["diagonal", "multi-positive"])
def test_contract_forward_backward(name: str, multi: bool) -> None:
    torch.manual_seed(0)
    loss = create_loss(name).train()
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    n_txt = 6 if multi else 4
    txt = torch.nn.functional.normalize(torch.randn(n_txt, 8), dim=1).requires_grad_(True)
    pos = None
    if multi:  # captions 0,1 -> image 0; 2 -> 1; 3,4 -> 2; 5 -> 3
        owner = torch.tensor([0, 0, 1, 2, 2, 3])
        pos = owner.unsqueeze(0) == torch.arange(4).unsqueeze(1)  # (4, 6)
    out = loss(img, txt, pos_mask=pos, step=10)
    terms = [k for k in out if k.endswith("_loss")]
    assert terms, f"{name} returned no *_loss term: {sorted(out)}"
    total = sum(out[k] for k in terms)
    assert total.dim() == 0 and torch.isfinite(total)
    for k, v in out.items():
        assert v.dim() == 0, f"{name}:{k} is not a scalar"
        if not k.endswith("_loss"):
            assert not v.requires_grad, f"metric {name}:{k} should be detached"
    total.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    assert txt.grad is not None and torch.isfinite(txt.grad).all()
    for pname, p in loss.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_needs_pos_mask_for_rectangular_batches(name: str) -> None:
    with pytest.raises(ValueError):
        create_loss(name)(torch.randn(2, 4), torch.randn(3, 4))


@pytest.mark.parametrize("name", ["hinge", "adapt_hinge", "infonce", "siglip", "triplet"])
def test_from_scores_matches_forward(name: str) -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    a = create_loss(name)(img, txt, step=3)
    b = create_loss(name).from_scores(img @ txt.t(), step=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# ---------------------------------------------------------------- hinge (VSE++)
# scores (image rows, text columns), diagonal positives, margin 0.2:
#   S = [[0.9, 0.5, 0.8],
#        [0.3, 0.6, 0.7],
#        [0.1, 0.4, 0.2]]
# text retrieval (row i vs S[i,i]):  i0: [.2+.5-.9]+=0, [.2+.8-.9]+=.1      -> sum .1, max .1
#                                    i1: [.2+.3-.6]+=0, [.2+.7-.6]+=.3      -> sum .3, max .3
#                                    i2: [.2+.1-.2]+=.1, [.2+.4-.2]+=.4     -> sum .5, max .4
# image retrieval (column t vs S[t,t]): t0: 0, 0                          -> sum 0,  max 0
#                                       t1: [.2+.5-.6]+=.1, [.2+.4-.6]+=0  -> sum .1, max .1
#                                       t2: [.2+.8-.2]+=.8, [.2+.7-.2]+=.7 -> sum 1.5, max .8
# sum of all violations = .1+.3+.5+0+.1+1.5 = 2.5; sum of hardest = .1+.3+.4+0+.1+.8 = 1.7
S3 = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.6, 0.7], [0.1, 0.4, 0.2]])

# multi-positive: S = [[0.9, 0.85, 0.6], [0.75, 0.7, 0.8]], image 0 <-> texts 0,1; image 1 <-> text 2
# anchors (0,0), (0,1), (1,2); text 1 is NOT a negative of pair (0,0) (else +[.2+.85-.9]=.15)
# text retrieval:  (0,0): t2 [.2+.6-.9]+=0          (0,1): t2 [.2+.6-.85]+=0
#                  (1,2): t0 [.2+.75-.8]+=.15, t1 [.2+.7-.8]+=.1   -> sum .25, max .15
# image retrieval: (0,0): i1 [.2+.75-.9]+=.05   (0,1): i1 [.2+.7-.85]+=.05   (1,2): i0 [.2+.6-.8]+=0
# sum = .25 + .10 = .35; hardest = .15 + .10 = .25
S_MULTI = torch.tensor([[0.9, 0.85, 0.6], [0.75, 0.7, 0.8]])


def test_hinge_golden() -> None:
    assert approx(create_loss("hinge", max_violation=False).from_scores(S3)["hinge_loss"], 2.5)
    assert approx(create_loss("hinge", max_violation=True).from_scores(S3)["hinge_loss"], 1.7)
    assert approx(create_loss("hinge", reduction="mean").from_scores(S3)["hinge_loss"], 1.7 / 3)


def test_hinge_golden_multi_positive() -> None:
    assert approx(create_loss("hinge", max_violation=False).from_scores(S_MULTI, MULTI_POS)["hinge_loss"], 0.35)
    assert approx(create_loss("hinge", max_violation=True).from_scores(S_MULTI, MULTI_POS)["hinge_loss"], 0.25)


def test_hinge_forward_uses_dot_products() -> None:
    # embeddings whose products are S3's first two rows/columns: img = rows, txt = identity
    img = torch.tensor([[0.9, 0.5], [0.3, 0.6]])
    txt = torch.eye(2)
    # S = [[.9,.5],[.3,.6]]: i0 vs t1 [.2+.5-.9]+=0; i1 vs t0 [.2+.3-.6]+=0;
    # t0 vs i1 [.2+.3-.9]+=0; t1 vs i0 [.2+.5-.6]+=.1  -> .1
    assert approx(create_loss("hinge")(img, txt)["hinge_loss"], 0.1)


# ---------------------------------------------------------------- ADAPT hinge
def test_adapt_hinge_golden_schedule() -> None:
    # k = 1 - 0.991**(step+1); loss = (1-k) * 2.5 + k * 1.7 (sums from the hinge case above)
    loss = create_loss("adapt_hinge")
    out0 = loss.from_scores(S3, step=0)
    assert approx(out0["k"], 0.009)
    assert approx(out0["hinge_loss"], 0.991 * 2.5 + 0.009 * 1.7)  # 2.4928
    out99 = loss.from_scores(S3, step=99)
    k99 = 1 - 0.991 ** 100  # 0.595083524
    assert approx(out99["k"], 0.595083524)
    assert approx(out99["hinge_loss"], (1 - k99) * 2.5 + k99 * 1.7)  # 2.023933
    assert approx(out99["hinge_loss"], 2.0239332, tol=1e-5)


def test_adapt_hinge_internal_counter() -> None:
    loss = create_loss("adapt_hinge", beta=0.5).train()
    ks = [float(loss.from_scores(S3)["k"]) for _ in range(3)]
    assert ks == pytest.approx([0.5, 0.75, 0.875])  # 1 - 0.5**n, n = 1, 2, 3 (ADAPT counts from 1)
    assert int(loss.state_dict()["iteration"]) == 3  # saved with checkpoints
    loss.eval()
    assert float(loss.from_scores(S3)["k"]) == pytest.approx(0.875)  # eval does not advance


def test_adapt_hinge_multi_positive() -> None:
    out = create_loss("adapt_hinge").from_scores(S_MULTI, MULTI_POS, step=0)
    assert approx(out["hinge_loss"], 0.991 * 0.35 + 0.009 * 0.25)


# ---------------------------------------------------------------- InfoNCE
def test_infonce_golden() -> None:
    # temperature 0.5 -> scale 2; S = [[1, 0], [.5, 1]] -> logits [[2, 0], [1, 2]]
    # i2t: row0 log(1+e^(0-2)) = .126928, row1 log(1+e^(1-2)) = .313262
    # t2i: col0 log(1+e^(1-2)) = .313262, col1 log(1+e^(0-2)) = .126928
    # loss = mean of the two means = (.126928 + .313262) / 2 = .220095
    loss = create_loss("infonce", init_temperature=0.5)
    out = loss.from_scores(torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert approx(out["contrastive_loss"], expected) and approx(expected, 0.220095, 1e-6)
    assert approx(out["logit_scale"], 2.0)


def test_infonce_golden_multi_positive() -> None:
    # scale 2; S = [[1, .5, 0], [0, .5, 1]] -> logits L = [[2, 1, 0], [0, 1, 2]]
    # i2t anchors: (0,0): negatives of image 0 = {t2}: log(1 + e^(0-2))           = .126928
    #              (0,1): log(1 + e^(0-1))                                        = .313262
    #              (1,2): negatives {t0, t1}: log(1 + e^(0-2) + e^(1-2))          = .407606
    # t2i anchors: (0,0): text 0, negatives {i1}: log(1 + e^(0-2))               = .126928
    #              (0,1): text 1, negatives {i1}: log(1 + e^(1-1))               = .693147
    #              (1,2): text 2, negatives {i0}: log(1 + e^(0-2))               = .126928
    # loss = (mean(i2t) + mean(t2i)) / 2 = (.282599 + .315668) / 2 = .299133
    e = math.exp
    i2t = (math.log1p(e(-2)) + math.log1p(e(-1)) + math.log1p(e(-2) + e(-1))) / 3
    t2i = (math.log1p(e(-2)) + math.log(2) + math.log1p(e(-2))) / 3
    loss = create_loss("infonce", init_temperature=0.5)
    out = loss.from_scores(torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]), MULTI_POS)
    assert approx(out["contrastive_loss"], (i2t + t2i) / 2)
    assert approx(out["contrastive_loss"], 0.299133, 1e-6)


def test_infonce_equals_clip_cross_entropy() -> None:
    torch.manual_seed(0)
    s = torch.randn(5, 5)
    out = create_loss("infonce").from_scores(s)["contrastive_loss"]
    logits = s / 0.07
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(5))
           + torch.nn.functional.cross_entropy(logits.t(), torch.arange(5))) / 2
    torch.testing.assert_close(out, ref)


def test_infonce_scale_clamped_and_learnable() -> None:
    loss = create_loss("infonce", init_temperature=0.001)  # scale 1000 -> clamped to 100
    assert approx(loss.from_scores(torch.eye(2))["logit_scale"], 100.0, 1e-3)
    assert loss.logit_scale.requires_grad
    assert approx(create_loss("infonce").logit_scale.detach(), math.log(1 / 0.07))
    assert not create_loss("infonce", learn_temperature=False).logit_scale.requires_grad


def test_infonce_anchor_without_negatives_is_finite() -> None:
    s = torch.tensor([[0.5, 0.2]], requires_grad=True)
    out = create_loss("infonce").from_scores(s, torch.tensor([[True, True]]))
    out["contrastive_loss"].backward()
    assert approx(out["contrastive_loss"], 0.0) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- SigLIP
def test_siglip_golden() -> None:
    # scale 1, bias 0, S = [[2, -1], [0, 1]], labels +1 on the diagonal, -1 elsewhere
    # terms: -log sig(2) = log(1+e^-2) = .126928; -log sig(+1) = .313262 (label -1, z -1)
    #        -log sig(-0) = log 2 = .693147;      -log sig(1)  = .313262
    # loss = sum / Bi = 1.446599 / 2 = .723300
    e = math.exp
    expected = (math.log1p(e(-2)) + 2 * math.log1p(e(-1)) + math.log(2)) / 2
    loss = create_loss("siglip", init_scale=1.0, init_bias=0.0)
    out = loss.from_scores(torch.tensor([[2.0, -1.0], [0.0, 1.0]]))
    assert approx(out["siglip_loss"], expected) and approx(expected, 0.723300, 1e-6)


def test_siglip_defaults_and_multi_positive() -> None:
    loss = create_loss("siglip")
    assert approx(loss.logit_scale.detach().exp(), 10.0) and approx(loss.logit_bias.detach(), -10.0)
    # z = 10 s - 10 with s = S_MULTI; labels from MULTI_POS
    s = S_MULTI
    z = 10 * s - 10
    y = MULTI_POS.float() * 2 - 1
    expected = sum(math.log1p(math.exp(-float(y[i, j] * z[i, j]))) for i in range(2) for j in range(3)) / 2
    assert approx(loss.from_scores(s, MULTI_POS)["siglip_loss"], expected, 1e-4)


# ---------------------------------------------------------------- triplet (X-MRS)
def test_triplet_golden() -> None:
    # images i0=(1,0), i1=(0,1); texts t0=(1,0), t1=(1,1)/sqrt2; cosine distance d = 1 - cos
    # d = [[0, 1-1/sqrt2], [1, 1-1/sqrt2]]  (1-1/sqrt2 = .292893)
    # image anchors: i0 [0 - .292893 + .3]+ = .007107; i1 [.292893 - 1 + .3]+ = 0  -> mean .003553
    # text anchors:  t0 [0 - 1 + .3]+ = 0;             t1 [.292893 - .292893 + .3]+ = .3 -> mean .15
    # triplet = .153553
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a = 1 - 1 / math.sqrt(2)
    out = create_loss("triplet")(img, txt)
    assert approx(out["triplet_loss"], (0.3 - a) / 2 + 0.15)
    assert "intra_loss" not in out


def test_triplet_golden_multi_positive_with_intra() -> None:
    # images i0=(1,0), i1=(0,1); texts t0=(1,0), t1=(.6,.8), t2=(0,1); i0 <-> t0,t1; i1 <-> t2
    # d(img, txt) = [[0, .4, 1], [1, .2, 0]]
    # image anchors: i0 hardest pos .4 (t1), hardest neg 1 (t2) -> [.4-1+.3]+ = 0
    #                i1 pos 0 (t2), hardest neg .2 (t1)        -> [0-.2+.3]+  = .1   -> mean .05
    # text anchors:  t0 [0-1+.3]+ = 0; t1 [.4-.2+.3]+ = .5; t2 [0-1+.3]+ = 0         -> mean .166667
    # triplet = .216667
    # intra (negatives from the anchor's own modality):
    #   image anchors: d(i0,i1) = 1: i0 [.4-1+.3]+ = 0; i1 [0-1+.3]+ = 0               -> mean 0
    #   text anchors: t0,t1 share image 0 so are not negatives of each other;
    #                 d(t0,t2) = 1, d(t1,t2) = .2
    #                 t0 [0-1+.3]+ = 0; t1 [.4-.2+.3]+ = .5; t2 [0-.2+.3]+ = .1         -> mean .2
    # intra = .2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    out = create_loss("triplet", intra_modal=True)(img, txt, pos_mask=MULTI_POS)
    assert approx(out["triplet_loss"], 0.05 + 0.5 / 3)
    assert approx(out["intra_loss"], 0.2)
    out2 = create_loss("triplet", intra_modal=True, intra_weight=0.5)(img, txt, pos_mask=MULTI_POS)
    assert approx(out2["intra_loss"], 0.1)


def test_triplet_is_scale_invariant() -> None:
    torch.manual_seed(0)
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    loss = create_loss("triplet", intra_modal=True)
    a, b = loss(img, txt), loss(img * 3.0, txt * 0.5)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
