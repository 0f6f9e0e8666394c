"""ADAPT's C kernels (models/kernels/adapt.c through models/adapt_native.py): the exponential,
scores and analytic gradients against autograd over the original computation, fallbacks."""
from __future__ import annotations

import ctypes

import pytest
import torch

from xmodal.errors import XmodalError
from xmodal.models import adapt_native, native
from xmodal.models.adapt import Adapt
from xmodal.models.base import TowerOutput

from test_adapt_grad import make_inputs, reference_scores

pytestmark = pytest.mark.skipif(not adapt_native.available(),
                                reason=f"no C compiler here: {native.error('adapt')}")


def test_exp_is_float32_exact():
    y = torch.cat([torch.linspace(-87.0, 0.0, 200_001), torch.linspace(0.0, 88.0, 10_001), torch.tensor([-1e-8, -0.0])])
    got = adapt_native.exp(y).double()
    want = torch.exp(y.double())
    rel = ((got - want).abs() / want).max()
    assert rel < 3e-7  # a few float32 ulps, like the library's exp
    assert adapt_native.exp(torch.tensor([-200.0])).item() < 1e-37  # clamped: as good as zero beside e^0


def _model(direction: str, fused: str, dim: int = 24, **kw) -> Adapt:
    torch.manual_seed(3)
    model = Adapt(None, None, dim, direction=direction, fused=fused, **kw).train()
    with torch.no_grad():
        model.adapt.fc_gamma.weight.mul_(3.0)  # a strong adaptation, so mistakes show
    return model


def _grads(model: Adapt, img: TowerOutput, txt: TowerOutput, weights: torch.Tensor, score_fn=None):
    img = TowerOutput(img.tokens.clone().requires_grad_(True), img.pooled, img.mask)
    txt = TowerOutput(txt.tokens.clone().requires_grad_(True), txt.pooled, txt.mask)
    model.zero_grad()
    ir, tr = model.encode_image_reps(img), model.encode_text_reps(txt)
    scores = (score_fn or model.score)(ir, tr)
    (scores * weights).sum().backward()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores.detach(), img.tokens.grad, txt.tokens.grad, params


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_native_training_path_equals_autograd(direction):
    img, txt = make_inputs(ni=6, nt=7, regions=5, length=6, dim=24, dtype=torch.float32, region_mask=True)
    weights = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    weights[weights.abs() < 0.6] = 0.0  # pairs without gradient are skipped: they must stay exact
    native_model = _model(direction, "native", train_smooth=True)
    ref_model = _model(direction, "eager", train_smooth=True).double()  # the reference in float64
    ref_model.load_state_dict(native_model.state_dict())
    got = _grads(native_model, img, txt, weights)
    as64 = [TowerOutput(t.tokens.double(), t.pooled.double(), t.mask) for t in (img, txt)]
    want = _grads(ref_model, *as64, weights.double(), lambda i, t: reference_scores(ref_model, i, t))
    for a, b in zip(got[:3], want[:3]):
        assert (a.double() - b).abs().max() <= 2e-5 * b.abs().max()
    assert got[3].keys() == want[3].keys() and "fovea.smooth" in got[3]
    for name in want[3]:  # float32 sums of cancelling terms (the smoothing's gradient above all)
        assert (got[3][name].double() - want[3][name]).abs().max() <= 1e-4 * want[3][name].abs().max(), name


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_native_scores_equal_the_torch_kernels(direction):
    img, txt = make_inputs(ni=9, nt=11, regions=4, length=7, dim=40, dtype=torch.float32, region_mask=False)
    a, b = _model(direction, "native", dim=40).eval(), _model(direction, "eager", dim=40).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        got = a.score(a.encode_image_reps(img), a.encode_text_reps(txt))
        want = b.score(b.encode_image_reps(img), b.encode_text_reps(txt))
    assert got.shape == (9, 11)
    assert torch.allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_native_score_pairs_equal_the_score_matrix(direction):
    img, txt = make_inputs(ni=9, nt=11, regions=4, length=7, dim=40, dtype=torch.float32, region_mask=False)
    model = _model(direction, "native", dim=40).eval()
    g = torch.Generator().manual_seed(2)
    image_idx = torch.randint(0, 9, (60,), generator=g)  # owners with lists of different lengths
    text_idx = torch.randint(0, 11, (60,), generator=g)
    with torch.no_grad():
        ir, tr = model.encode_image_reps(img), model.encode_text_reps(txt)
        full = model.score(ir, tr)
        got = model.score_pairs(ir, tr, image_idx, text_idx)
    assert torch.allclose(got, full[image_idx, text_idx], atol=1e-6, rtol=0)


def test_a_mask_that_is_not_a_prefix_uses_the_torch_kernels():
    tok = torch.randn(3, 4, 8)
    mask = torch.tensor([[True, False, True, True], [True, True, False, False], [True] * 4])
    assert adapt_native.lengths_of(mask, tok) is None
    assert adapt_native.lengths_of(mask[1:2], tok[1:2]).tolist() == [2]
    assert adapt_native.lengths_of(None, tok).tolist() == [4, 4, 4]
    assert adapt_native.lengths_of(torch.zeros(1, 4, dtype=torch.bool), tok[:1]) is None  # no real token
    img, txt = make_inputs(ni=3, nt=4, regions=4, length=5, dim=8, dtype=torch.float32, region_mask=False)
    txt = TowerOutput(txt.tokens, txt.pooled, torch.tensor([[True, False, True, True, True]] * 4))
    a, b = _model("i2t", "auto", dim=8).eval(), _model("i2t", "eager", dim=8).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a.score(a.encode_image_reps(img), a.encode_text_reps(txt)),
                              b.score(b.encode_image_reps(img), b.encode_text_reps(txt)), atol=1e-6)


def test_unavailable_kernels_fall_back_or_say_why(monkeypatch):
    monkeypatch.setitem(native._loaded, "adapt", None)
    monkeypatch.setitem(native._errors, "adapt", "no C compiler found")
    img, txt = make_inputs(ni=3, nt=4, regions=4, length=5, dim=8, dtype=torch.float32, region_mask=False)
    auto = _model("t2i", "auto", dim=8)
    assert auto.score(auto.encode_image_reps(img), auto.encode_text_reps(txt)).shape == (3, 4)
    forced = _model("t2i", "native", dim=8)
    with pytest.raises(XmodalError, match="no C compiler found"):
        forced.score(forced.encode_image_reps(img), forced.encode_text_reps(txt))


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    cc = native._compiler()
    src = tmp_path / "k.c"
    src.write_text("void twice(float *x, long n) { for (long i = 0; i < n; i++) x[i] *= 2.0f; }\n")
    lib = native._build("k", src, cc)
    assert lib.parent == tmp_path / "kernels" and lib.is_file()
    assert native._build("k", src, cc) == lib  # reused, not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind
    x = torch.ones(5)
    ctypes.CDLL(str(lib)).twice(native.ptr(x), ctypes.c_long(5))
    assert x.tolist() == [2.0] * 5
    src.write_text("this is not C\n")
    with pytest.raises(XmodalError, match="k.c"):
        native._build("k", src, cc)
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]


def test_split_work_balances_token_counts():
    w = torch.tensor([1, 1, 1, 1, 10, 10, 1, 1])
    parts = native.split_work(w, 2)
    assert parts[0][0] == 0 and parts[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sums = [int(w[i0:i1].sum()) for i0, i1 in parts]
    assert max(sums) <= 16  # 26 in all: no half is more than one big item over 13
    assert native.split_work(torch.tensor([3]), 4) == [(0, 1)]


def test_native_off_by_environment(monkeypatch):
    monkeypatch.setenv("XMODAL_NATIVE", "0")
    assert not native.enabled()
