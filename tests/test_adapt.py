"""ADAPT model: golden layers, fused scoring vs the original per-caption computation, training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.config import ModelConfig, TowerConfig
from xmodal.errors import ConfigError
from xmodal.models import create_model, list_models
from xmodal.models import adapt as adapt_mod
from xmodal.models.adapt import Adapt, AdaptEnsemble, AdaptLayer, Fovea, MaskedBatchNorm
from xmodal.models.base import PairScorer, TowerOutput


# ---------------------------------------------------------------------------------------
# golden layers
# ---------------------------------------------------------------------------------------
def test_adapt_layer_golden():
    layer = AdaptLayer(2, 2)
    with torch.no_grad():
        layer.fc_gamma.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.fc_gamma.bias.copy_(torch.tensor([0.0, -1.0]))
        layer.fc_beta.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        layer.fc_beta.bias.copy_(torch.tensor([0.5, 0.0]))
    query = torch.tensor([[1.0, 2.0]])
    value = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])
    # gamma = [1, 3] -> scale [2, 4]; beta = [2.5, 1]
    out = layer(value, query)
    torch.testing.assert_close(out, torch.tensor([[[4.5, -3.0], [2.5, 9.0]]]))
    scale, shift = layer.scale_shift(query)
    torch.testing.assert_close(scale, torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(shift, torch.tensor([[2.5, 1.0]]))


def test_fovea_golden():
    fovea = Fovea(smooth=1.0)
    x = torch.tensor([[[0.0, 1.0], [math.log(3.0), 0.0]]])  # (B=1, N=2, D=2)
    e = math.e
    # channel 0: softmax([0, ln 3]) = [1/4, 3/4]; channel 1: softmax([1, 0]) = [e/(e+1), 1/(e+1)]
    expected = torch.tensor([[[0.0, e / (e + 1)], [0.75 * math.log(3.0), 0.0]]])
    torch.testing.assert_close(fovea(x), expected)
    masked = fovea(x, torch.tensor([[True, False]]))  # only token 0 is real: weight 1
    torch.testing.assert_close(masked, torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
    sharp = Fovea(smooth=10.0)(x)  # the paper's smoothing sharpens the weights
    assert float(sharp[0, 1, 0]) > float(fovea(x)[0, 1, 0])


def test_masked_batchnorm_uses_real_tokens_only():
    bn = MaskedBatchNorm(1, affine=False)
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [-50.0]]])  # (2, 3, 1)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = bn(x, mask)
    real = np.array([1.0, 3.0, 5.0, 7.0])
    expected = (real - real.mean()) / np.sqrt(real.var() + bn.eps)
    np.testing.assert_allclose(out[mask].squeeze(-1).numpy(), expected, rtol=1e-6)
    assert float(out[~mask].abs().sum()) == 0.0
    np.testing.assert_allclose(bn.running_mean.numpy(), [0.1 * real.mean()], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), [0.9 + 0.1 * real.var(ddof=1)], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# scoring against the original computation
# ---------------------------------------------------------------------------------------
def naive_scores(model: Adapt, img: TowerOutput, txt: TowerOutput) -> torch.Tensor:
    """The original's per-caption, per-image computation with the layers as written."""
    ni = img.tokens.shape[0] if model.direction == "t2i" else img.pooled.shape[0]
    nt = txt.pooled.shape[0] if model.direction == "t2i" else txt.tokens.shape[0]
    out = torch.zeros(ni, nt, dtype=txt.pooled.dtype)
    for t in range(nt):
        for i in range(ni):
            if model.direction == "t2i":
                query = txt.pooled[t:t + 1]
                value = img.tokens[i:i + 1] if img.mask is None else img.tokens[i:i + 1, img.mask[i]]
                vec = model.fovea(model.adapt(value, query)).mean(1)  # Fovea, then mean over regions
            else:
                query = img.pooled[i:i + 1]
                value = txt.tokens[t:t + 1] if txt.mask is None else txt.tokens[t:t + 1, txt.mask[t]]
                vec = model.fovea(model.adapt(value, query)).amax(1)  # Fovea, then max over words
            out[i, t] = F.cosine_similarity(vec, query, eps=1e-12)[0]
    return out


def make_inputs(ni=5, nt=6, r=4, length=5, dim=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(ni, r, dim, generator=g, dtype=dtype)
    rmask = torch.ones(ni, r, dtype=torch.bool)
    rmask[1, 2:] = False
    words = torch.randn(nt, length, dim, generator=g, dtype=dtype)
    wmask = torch.ones(nt, length, dtype=torch.bool)
    wmask[0, 3:] = False
    wmask[4, 1:] = False
    return TowerOutput(regions, regions.mean(1), rmask), TowerOutput(words, words.mean(1), wmask)


def bare_model(direction: str, dim: int = 6, fused: str = "eager", seed: int = 0, **kw) -> Adapt:
    torch.manual_seed(seed)
    model = Adapt(None, None, dim, direction=direction, fused=fused, **kw).double()
    with torch.no_grad():
        model.adapt.fc_gamma.weight.mul_(3.0)  # a strong adaptation, so mistakes show
    return model


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_score_equals_per_pair_loop(direction):
    model = bare_model(direction, chunk_mb=0.002).eval()  # tiny chunks: several tiles per call
    img_in, txt_in = make_inputs()
    with torch.no_grad():
        img, txt = model.encode_image_reps(img_in), model.encode_text_reps(txt_in)
        fused = model.score(img, txt)
        torch.testing.assert_close(fused, naive_scores(model, img, txt), rtol=0, atol=1e-12)
        ii, tt = torch.tensor([0, 1, 4, 4, 2]), torch.tensor([5, 0, 4, 1, 1])
        torch.testing.assert_close(model.score_pairs(img, txt, ii, tt), fused[ii, tt], rtol=0, atol=1e-12)
        # skewed pair lists (1 to 6 pairs per item, shuffled, repeated): padded row groups
        g = torch.Generator().manual_seed(1)
        ii = torch.cat([torch.full((n,), i) for i, n in enumerate([6, 1, 3, 2, 5])])
        tt = torch.randint(0, 6, (len(ii),), generator=g)
        perm = torch.randperm(len(ii), generator=g)
        ii, tt = torch.cat([ii[perm], ii[:3]]), torch.cat([tt[perm], tt[:3]])
        torch.testing.assert_close(model.score_pairs(img, txt, ii, tt), fused[ii, tt], rtol=0, atol=1e-12)


def test_t2i_golden_numpy():
    """Encoders + BatchNorm (eval statistics) + ADAPT + Fovea + cosine, written out in numpy."""
    dim = 3
    model = bare_model("t2i", dim=dim).eval()
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64))
        model.norm.running_var.copy_(torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64))
    regions = np.array([[[1.0, -2.0, 0.5], [0.3, 0.4, -1.0]], [[-0.5, 1.0, 2.0], [2.0, 0.1, 0.2]]])
    words = np.array([[[0.2, 1.0, -0.3], [1.0, 0.5, 0.5]]])
    img = model.encode_image_reps(TowerOutput(torch.from_numpy(regions), torch.zeros(2, dim), None))
    txt = model.encode_text_reps(TowerOutput(torch.from_numpy(words), torch.zeros(1, dim), None))
    with torch.no_grad():
        got = model.score(img, txt).numpy()
    wg, bg = (p.detach().numpy() for p in (model.adapt.fc_gamma.weight, model.adapt.fc_gamma.bias))
    wb, bb = (p.detach().numpy() for p in (model.adapt.fc_beta.weight, model.adapt.fc_beta.bias))
    x = np.where(regions > 0, regions, 0.1 * regions)  # LeakyReLU(0.1)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    x = (x - [0.1, -0.2, 0.05]) / np.sqrt(np.array([0.5, 2.0, 1.5]) + 1e-5)
    w = words / np.linalg.norm(words, axis=-1, keepdims=True)
    c = w[0].mean(0)
    gamma, beta = wg @ c + bg, wb @ c + bb
    for i in range(2):
        a = x[i] * (gamma + 1) + beta  # (R, D)
        p = np.exp(10 * a) / np.exp(10 * a).sum(0)
        v = (p * a).mean(0)
        expected = v @ c / (np.linalg.norm(v) * np.linalg.norm(c))
        assert got[i, 0] == pytest.approx(expected, abs=1e-12)


def test_large_smoothing_is_stable():
    """Large |k x| would overflow a naive exp; the shifted form stays finite and exact."""
    model = bare_model("t2i", smooth=200.0).eval()
    img_in, txt_in = make_inputs()
    with torch.no_grad():
        img, txt = model.encode_image_reps(img_in), model.encode_text_reps(txt_in)
        fused = model.score(img, txt)
        assert bool(torch.isfinite(fused).all())
        torch.testing.assert_close(fused, naive_scores(model, img, txt), rtol=0, atol=1e-10)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gradients_equal_autograd_of_the_loop(direction):
    """The fused analytic backward (both directions) equals autograd through the loop."""
    model = bare_model(direction, chunk_mb=0.002, train_smooth=True).train()
    img_in, txt_in = make_inputs()
    regions = img_in.tokens.clone().requires_grad_(True)
    words = txt_in.tokens.clone().requires_grad_(True)

    def run(score_fn):
        model.zero_grad()
        regions.grad = words.grad = None
        img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), img_in.mask))
        txt = model.encode_text_reps(TowerOutput(words, words.mean(1), txt_in.mask))
        s = score_fn(img, txt)
        weights = torch.linspace(-1.0, 2.0, s.numel(), dtype=s.dtype).view_as(s)
        (s * weights).sum().backward()
        return [s.detach(), regions.grad, words.grad, model.adapt.fc_gamma.weight.grad,
                model.adapt.fc_beta.bias.grad, model.fovea.smooth.grad]

    fast, slow = run(model.score), run(lambda i, t: naive_scores(model, i, t))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert float(fast[1].abs().sum()) > 0 and float(fast[5].abs()) > 0


# ---------------------------------------------------------------------------------------
# shapes, ensemble, inputs, training through the task
# ---------------------------------------------------------------------------------------
def test_shapes_t2i_i2t_and_ensemble():
    img_in, txt_in = make_inputs(ni=3, nt=7)
    members = [bare_model("t2i", seed=1).eval(), bare_model("i2t", seed=2).eval()]
    ens = AdaptEnsemble(members)
    assert isinstance(ens, PairScorer) and ens.task_name() == "pair"
    with torch.no_grad():
        scores = {}
        for name, model in (("t2i", members[0]), ("i2t", members[1]), ("ens", ens)):
            img, txt = model.encode_image_reps(img_in), model.encode_text_reps(txt_in)
            scores[name] = model.score(img, txt)
            assert scores[name].shape == (3, 7)
            assert model.score_pairs(img, txt, torch.tensor([2, 0]), torch.tensor([6, 3])).shape == (2,)
        torch.testing.assert_close(scores["ens"], (scores["t2i"] + scores["i2t"]) / 2)
    assert bool((scores["t2i"].abs() <= 1 + 1e-9).all())
    with pytest.raises(ConfigError):
        AdaptEnsemble(members[:1])


def test_representations_are_compact():
    """The conditioning side keeps only its vector (evaluation holds every item's reps)."""
    img_in, txt_in = make_inputs()
    t2i, i2t = bare_model("t2i").eval(), bare_model("i2t").eval()
    assert t2i.encode_text_reps(txt_in).tokens.shape[1] == 1
    assert t2i.encode_image_reps(img_in).tokens.shape[1] == 4
    assert i2t.encode_image_reps(img_in).tokens.shape[1] == 1
    assert i2t.encode_text_reps(txt_in).tokens.shape[1] == 5


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    from xmodal.models.text.bigru import train_tokenizer

    return train_tokenizer(["a red ball on the grass", "two dogs play", "a cat sleeps on a red sofa"])


def adapt_config(tokenizer_json: str, **args) -> ModelConfig:
    return ModelConfig(type="adapt", image=TowerConfig("features", {"in_dim": 10, "out_dim": 12}, frozen=False),
                       text=TowerConfig("bigru", {"tokenizer_json": tokenizer_json, "word_dim": 8, "out_dim": 12},
                                        frozen=False),
                       args={"fused": "eager", **args})


@pytest.mark.parametrize("variant", ["t2i", "i2t"])
def test_forward_backward_through_the_task(tokenizer_json, variant):
    from xmodal.losses import create_loss
    from xmodal.data.inputs import Batch
    from xmodal.train.tasks import build_task

    assert "adapt" in list_models()
    model = create_model(adapt_config(tokenizer_json, variant=variant))
    assert model.input_needs() == ("tokens", "tokens")
    task = build_task(model, create_loss("adapt_hinge"))
    assert type(task).__name__ == "PairScoreTask"
    regions = torch.randn(4, 5, 10)
    texts = ["a red ball", "two dogs play on the grass", "a cat", "red sofa"]
    batch = Batch(text_idx=np.arange(4), image_idx=np.arange(4), pos_mask=torch.eye(4, dtype=torch.bool),
                  images=regions, texts=texts)
    losses, _ = task.training_step(batch, step=0)
    sum(losses.values()).backward()
    for name, param in (("image tower", model.image_tower.fc.weight), ("text tower", model.text_tower.rnn.weight_ih_l0),
                        ("adapt", model.adapt.fc_gamma.weight)):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_tower_output_inputs_skip_the_towers(tokenizer_json):
    model = create_model(adapt_config(tokenizer_json)).eval()
    regions = torch.randn(3, 5, 10)
    texts = ["a red ball", "two dogs", "a cat sleeps"]
    with torch.no_grad():
        raw_img, raw_txt = model.encode_image_reps(regions), model.encode_text_reps(texts)
        cached_img = model.encode_image_reps(model.image_tower(regions))
        cached_txt = model.encode_text_reps(model.text_tower(model.text_tower.tokenize(texts)))
        torch.testing.assert_close(model.score(cached_img, cached_txt), model.score(raw_img, raw_txt))
        with_boxes = model.encode_image_reps({"features": regions, "mask": torch.ones(3, 5, dtype=torch.bool)})
        torch.testing.assert_close(with_boxes.tokens, raw_img.tokens)


def test_config_errors(tokenizer_json):
    with pytest.raises(ConfigError, match="model.args.unknown"):
        create_model(adapt_config(tokenizer_json, unknown=1))
    with pytest.raises(ConfigError, match="variant"):
        create_model(adapt_config(tokenizer_json, variant="both"))
    with pytest.raises(ConfigError, match="members"):
        create_model(ModelConfig(type="adapt", args={"variant": "ens"}))
    with pytest.raises(ConfigError, match="smooth"):
        create_model(adapt_config(tokenizer_json, smooth="ten"))
    bad = adapt_config(tokenizer_json)
    bad.image.args["out_dim"] = 16
    with pytest.raises(ConfigError, match="latent size"):
        create_model(bad)


def test_state_dict_round_trip(tokenizer_json):
    a = create_model(adapt_config(tokenizer_json, smooth=5.0))
    b = create_model(adapt_config(tokenizer_json, smooth=5.0))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    regions, texts = torch.randn(2, 5, 10), ["a cat", "two red dogs"]
    with torch.no_grad():
        torch.testing.assert_close(a.score(a.encode_image_reps(regions), a.encode_text_reps(texts)),
                                   b.score(b.encode_image_reps(regions), b.encode_text_reps(texts)))
    assert "norm.running_var" in a.state_dict() and "fovea.smooth" not in a.state_dict()


@pytest.mark.slow
@pytest.mark.skipif(not adapt_mod.compile_available(), reason="torch.compile disabled")
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_compiled_kernels_match_eager(direction):
    """Inductor-compiled kernels (inference, and the fused training forward and backward with
    a learnt smoothing) equal the eager ones."""
    img_in, txt_in = make_inputs(dtype=torch.float32, dim=16)
    out = {}
    for fused in ("eager", "compile"):
        model = bare_model(direction, dim=16, fused=fused, train_smooth=True).float().train()
        regions = img_in.tokens.clone().requires_grad_(True)
        words = txt_in.tokens.clone().requires_grad_(True)
        img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), img_in.mask))
        txt = model.encode_text_reps(TowerOutput(words, words.mean(1), txt_in.mask))
        s = model.score(img, txt)
        s.pow(2).sum().backward()
        model.eval()
        with torch.no_grad():
            infer = model.score(model.encode_image_reps(img_in), model.encode_text_reps(txt_in))
        out[fused] = (s.detach(), regions.grad, words.grad, model.adapt.fc_gamma.weight.grad,
                      model.fovea.smooth.grad, infer)
    assert not adapt_mod._Kernel.failed
    for a, b in zip(out["eager"], out["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))


# ---------------------------------------------------------------------------------------
# end to end: precomp regions -> train (CLI) -> reload -> exact and two-stage evaluation
# ---------------------------------------------------------------------------------------
def test_train_and_evaluate_through_the_cli(tmp_path, capsys):
    import json

    from train_fixtures import write_synthetic_precomp
    from xmodal.cli import main

    data = write_synthetic_precomp(tmp_path / "precomp")
    runs = {}
    for variant in ("t2i", "i2t"):
        cfg = tmp_path / f"{variant}.yaml"
        cfg.write_text(f"""
name: adapt-{variant}
data: {{format: precomp, path: {data}, train_split: train, val_split: dev, test_split: test}}
model:
  type: adapt
  image: {{name: features, args: {{in_dim: 16, out_dim: 32}}, frozen: false}}
  text: {{name: bigru, args: {{word_dim: 16, out_dim: 32}}, frozen: false}}
  args: {{variant: {variant}, fused: eager}}
loss: {{name: adapt_hinge, args: {{margin: 0.2, beta: 0.9}}}}
optim: {{name: adam, lr: 0.005, schedule: cosine, warmup_steps: 5}}
train: {{steps: 100, batch_size: 16, eval_every: 50, log_every: 50, tensorboard: false}}
""")
        runs[variant] = tmp_path / variant
        assert main(["train", str(cfg), "--out", str(runs[variant]), "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["eval", str(runs[variant]), "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        # 40 test images, 80 captions: chance rsum is about 90; colours x shapes must be learnt
        assert metrics["rsum"] > 250, (variant, metrics)
        assert main(["eval", str(runs[variant]), "--json", "--rerank-k", "80"]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)  # k >= all: exact
    # ADAPT-Ens: the two runs' scores averaged
    ens = create_model(ModelConfig(type="adapt", args={"variant": "ens", "members": [str(runs["t2i"]),
                                                                                     str(runs["i2t"])]}))
    assert isinstance(ens, AdaptEnsemble) and len(ens.members) == 2


def test_i2t_analytic_gradient_equals_autograd():
    """ADAPT-I2T training with a fixed smoothing: the fused analytic backward gives autograd's
    gradients through the per-pair loop to 1e-10 in float64, padding included."""
    img_in, txt_in = make_inputs(ni=4, nt=7, length=5, dim=6)
    grads, scores = {}, {}
    model = bare_model("i2t", chunk_mb=0.003).train()
    for name, fn in (("fused", model.score), ("loop", lambda i, t: naive_scores(model, i, t))):
        model.zero_grad()
        words = txt_in.tokens.clone().requires_grad_(True)
        regions = img_in.tokens.clone().requires_grad_(True)
        img = model.encode_image_reps(TowerOutput(regions, regions.mean(1), img_in.mask))
        txt = model.encode_text_reps(TowerOutput(words, words.mean(1), txt_in.mask))
        s = fn(img, txt)
        weights = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=s.dtype)
        (s * weights).sum().backward()
        scores[name] = s.detach()
        grads[name] = (words.grad, regions.grad, model.adapt.fc_gamma.weight.grad, model.adapt.fc_beta.weight.grad)
    torch.testing.assert_close(scores["fused"], scores["loop"], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads["fused"], grads["loop"]):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
