"""ADAPT training path (``_AdaptScore``): fused scores and analytic gradients against autograd."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xmodal.models import adapt as adapt_mod
from xmodal.models.adapt import Adapt
from xmodal.models.base import TowerOutput


def reference_scores(model: Adapt, img: TowerOutput, txt: TowerOutput) -> torch.Tensor:
    """Autograd over the original computation, vectorised: (Ni, Nt)."""
    t2i = model.direction == "t2i"
    tok, cond = (img, txt) if t2i else (txt, img)
    d = model.dim
    c = cond.tokens[:, 0]
    scale, shift, unit = c[:, :d], c[:, d:2 * d], c[:, 2 * d:]
    a = tok.tokens[None] * scale[:, None, None] + shift[:, None, None]  # (Nc, Nk, L, D)
    logits = a * model.fovea.smooth
    pad = None if tok.mask is None else ~tok.mask[None, :, :, None]
    if pad is not None:
        logits = logits.masked_fill(pad, float("-inf"))
    pa = torch.softmax(logits, dim=2) * a
    if t2i:
        n = 1.0 if tok.mask is None else tok.mask.sum(1).to(a.dtype)[None, :, None]
        v = (pa if pad is None else pa.masked_fill(pad, 0.0)).sum(2) / n  # Fovea mean over real regions
    else:
        v = (pa if pad is None else pa.masked_fill(pad, float("-inf"))).amax(2)
    s = F.cosine_similarity(v, unit[:, None], dim=-1, eps=1e-8)  # (Nc, Nk)
    return s.t() if t2i else s


def make_inputs(ni=5, nt=7, regions=4, length=6, dim=8, dtype=torch.float64, seed=0, region_mask=True):
    g = torch.Generator().manual_seed(seed)
    regions_t = torch.randn(ni, regions, dim, generator=g, dtype=dtype)
    words = torch.randn(nt, length, dim, generator=g, dtype=dtype)
    wlen = torch.tensor([1, length, 2, 3, length - 1, 4, 2] * nt)[:nt]  # one-word captions too
    wmask = torch.arange(length)[None] < wlen[:, None]
    rmask = None
    if region_mask:
        rlen = torch.tensor([regions, 2, regions - 1, 1, regions] * ni)[:ni]
        rmask = torch.arange(regions)[None] < rlen[:, None]
    return TowerOutput(regions_t, regions_t.mean(1), rmask), TowerOutput(words, words.mean(1), wmask)


def model_for(direction, dim=8, **kw):
    torch.manual_seed(3)
    model = Adapt(None, None, dim, direction=direction, fused="eager", **kw).double().train()
    with torch.no_grad():
        model.adapt.fc_gamma.weight.mul_(3.0)  # a strong adaptation, so mistakes show
    return model


def step(model, score_fn, img_in, txt_in, weights=None):
    """Scores and the gradients of a weighted sum of them: tokens, adapt layer, smoothing."""
    model.zero_grad()
    regions = img_in.tokens.clone().requires_grad_(True)
    words = txt_in.tokens.clone().requires_grad_(True)
    img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), img_in.mask))
    txt = model.encode_text_reps(TowerOutput(words, words.mean(1), txt_in.mask))
    s = score_fn(img, txt)
    if weights is None:
        weights = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=s.dtype)
    (s * weights).sum().backward()
    smooth = model.fovea.smooth.grad if model.fovea.train_smooth else None
    out = [s.detach(), regions.grad, words.grad, model.adapt.fc_gamma.weight.grad, model.adapt.fc_gamma.bias.grad,
           model.adapt.fc_beta.weight.grad]
    return out + ([smooth] if smooth is not None else [])


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("chunk_mb", [0.0005, 256.0])  # one pair per tile / one tile
def test_fused_gradients_equal_autograd_float64(direction, chunk_mb):
    """Every gradient (tokens through BatchNorm, the adapt layer, the learnt smoothing) equals
    autograd of the original computation to 1e-10 in float64, with padding on both sides."""
    model = model_for(direction, chunk_mb=chunk_mb, train_smooth=True)
    img, txt = make_inputs()
    fast = step(model, model.score, img, txt)
    slow = step(model, lambda i, t: reference_scores(model, i, t), img, txt)
    assert len(fast) == 7
    for a, b in zip(fast, slow):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gradcheck_of_the_autograd_function(direction):
    """torch.autograd.gradcheck of ``_AdaptScore`` itself: analytic vs finite differences for
    the tokens, scale, shift, unit vectors and smoothing (double precision, padded tokens)."""
    g = torch.Generator().manual_seed(5)
    nk, nc, length, dim = 3, 4, 5, 3
    tok = torch.randn(nk, length, dim, generator=g, dtype=torch.float64)
    mask = torch.arange(length)[None] < torch.tensor([5, 2, 3])[:, None]
    scale = (1.0 + 0.5 * torch.randn(nc, dim, generator=g, dtype=torch.float64))
    shift = 0.3 * torch.randn(nc, dim, generator=g, dtype=torch.float64)
    unit = F.normalize(torch.randn(nc, dim, generator=g, dtype=torch.float64), dim=-1)
    smooth = torch.tensor(2.0, dtype=torch.float64)
    kernels = ((adapt_mod._t2i_train_fwd, adapt_mod._t2i_train_bwd) if direction == "t2i"
               else (adapt_mod._i2t_train_fwd, adapt_mod._i2t_train_bwd))
    inputs = [x.clone().requires_grad_(True) for x in (tok, scale, shift, unit, smooth)]

    def fn(tok, scale, shift, unit, smooth):
        return adapt_mod._AdaptScore.apply(tok, scale, shift, unit, smooth, mask, kernels, False, 2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_float32_matches_autograd(direction):
    """The training path in float32 against the autograd reference at float32 tolerance."""
    model = model_for(direction, dim=32).float()
    img, txt = make_inputs(ni=9, nt=7, regions=6, length=6, dim=32, dtype=torch.float32)
    fast = step(model, model.score, img, txt)
    slow = step(model, lambda i, t: reference_scores(model, i, t), img, txt)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5 * float(b.abs().max()))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_width_does_not_change_work_or_results(direction):
    """Tokens padded far beyond the longest item (a text cache padded to the corpus' longest
    caption) give the same scores and gradients: chunks are trimmed to their real tokens."""
    model = model_for(direction)
    img, txt = make_inputs(region_mask=False)
    wide = torch.cat([txt.tokens, torch.randn(7, 30, 8, dtype=torch.float64)], dim=1)  # garbage padding
    wmask = torch.cat([txt.mask, torch.zeros(7, 30, dtype=torch.bool)], dim=1)
    narrow = step(model, model.score, img, txt)
    padded = step(model, model.score, img, TowerOutput(wide, txt.pooled, wmask))
    for a, b in zip(narrow[:2] + narrow[3:], padded[:2] + padded[3:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(padded[2][:, :6], narrow[2], rtol=1e-12, atol=1e-14)
    assert float(padded[2][:, 6:].abs().max()) == 0.0
    order, chunks = adapt_mod._owner_chunks(wmask, 7, wmask.shape[1], 3)
    assert [lc for _, lc in chunks] == [2, 5, 6]  # sorted by length, each trimmed to its longest
    assert sorted(order.tolist()) == list(range(7)) and wmask[order].sum(1).tolist() == [1, 2, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_training_step_is_deterministic(direction):
    model = model_for(direction, dim=16, chunk_mb=0.002).float()
    img, txt = make_inputs(dim=16, dtype=torch.float32)
    a = step(model, model.score, img, txt)
    b = step(model, model.score, img, txt)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def adapt_native_ok() -> bool:
    from xmodal.models import adapt_native

    return adapt_native.available()


def test_benchmark_dry_run():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt_train_step.py"
    spec = importlib.util.spec_from_file_location("adapt_train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    rows = bench.main(["--dry-run", "--compare-fused", "eager"] + (["--kernel-floor"] if adapt_native_ok() else []))
    assert [r["variant"] for r in rows] == ["t2i", "i2t"]
    for r in rows:
        assert r["autograd_s"] > 0 and r["fused_s"] > 0 and r["other_s"] > 0
        assert r["max_rel_err"] < 1e-4  # the fused path's scores and gradients are autograd's


def test_emoji_table_writes_a_readable_table(tmp_path):
    """The benchmark's stand-in for a user's table reads back with the ``table`` format."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "emoji_table.py"
    spec = importlib.util.spec_from_file_location("emoji_table_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    csv_path = mod.write_table(tmp_path / "t", images=3, captions=2)
    from xmodal.data import load_dataset

    ds = load_dataset("table", str(csv_path), "train")
    assert ds.num_images == 3 and ds.num_texts == 6
    assert all(ds.captions[2 * i + 1].startswith(ds.captions[2 * i] + ": ") for i in range(3))  # label + tags
