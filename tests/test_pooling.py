"""Pooling heads: registry contract (forward + backward), mask handling, GPO properties."""
from __future__ import annotations

import pytest
import torch

from xmodal.models.base import POOLING
from xmodal.models.heads import as_mask, create_pooling, list_pooling


def _tokens(B: int = 3, N: int = 5, D: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g)


def test_registry_lists_heads() -> None:
    assert {"mean", "max", "gpo"} <= set(list_pooling())


@pytest.mark.parametrize("name", POOLING.names())
def test_contract_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    head = create_pooling(name, dim=8)
    x = _tokens().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = head(x, mask)
    assert out.shape == (3, 8)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # padding never receives gradient
    assert torch.all(x.grad[~mask] == 0)
    for p in head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", POOLING.names())
def test_padding_values_do_not_matter(name: str) -> None:
    torch.manual_seed(0)
    head = create_pooling(name, dim=8).eval()
    x = _tokens()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = x.clone()
    noisy[~mask] = 1e3
    torch.testing.assert_close(head(x, mask), head(noisy, mask))
    # lengths give the same result as the equivalent prefix mask
    torch.testing.assert_close(head(x, mask), head(x, torch.tensor([3, 5, 1])))
    # extra padding columns change nothing
    padded = torch.cat([x, torch.randn(3, 4, 8)], dim=1)
    pmask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(head(x, mask), head(padded, pmask))


@pytest.mark.parametrize("name", POOLING.names())
def test_empty_row_pools_to_zero(name: str) -> None:
    head = create_pooling(name, dim=8).eval()
    x = _tokens(B=2)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = head(x, mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0)


def test_mean_and_max_values() -> None:
    x = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(create_pooling("mean")(x, mask), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(create_pooling("max")(x, mask), torch.tensor([[3.0, 4.0]]))
    # no mask: every token counts
    torch.testing.assert_close(create_pooling("max")(x), torch.tensor([[100.0, 100.0]]))


def test_as_mask_lengths() -> None:
    x = torch.zeros(2, 4, 1)
    m = as_mask(torch.tensor([1, 3]), x)
    assert m.tolist() == [[True, False, False, False], [True, True, True, False]]
    with pytest.raises(ValueError):
        as_mask(torch.ones(2, 3, dtype=torch.bool), x)


def test_gpo_shape_and_permutation_invariance() -> None:
    torch.manual_seed(0)
    gpo = create_pooling("gpo", dim=16).eval()
    x = _tokens(B=2, N=7, D=16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = gpo(x, mask)
    assert out.shape == (2, 16)
    perm = torch.randperm(7)
    torch.testing.assert_close(gpo(x[:, perm], mask[:, perm]), out)


def test_gpo_weights_and_extremes() -> None:
    """Weights are a softmax over sorted ranks; the result lies between min and max per dim."""
    torch.manual_seed(0)
    gpo = create_pooling("gpo", dim=4).eval()
    x = _tokens(B=2, N=6, D=4)
    lengths = torch.tensor([6, 2])
    pooled, weights = gpo(x, lengths, return_weights=True)
    assert weights.shape == (2, 6)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert torch.all(weights[1, 2:] < 1e-6)  # padding ranks get (numerically) no weight
    mask = as_mask(lengths, x)
    hi = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
    lo = x.masked_fill(~mask.unsqueeze(-1), float("inf")).min(dim=1).values
    assert torch.all(pooled <= hi + 1e-5) and torch.all(pooled >= lo - 1e-5)
    # one token: pooling is the identity
    single = gpo(x[:, :1])
    torch.testing.assert_close(single, x[:, 0])


def test_gpo_weights_depend_only_on_length() -> None:
    """Same length -> same rank weights, whatever the features (the GRU reads positions only)."""
    torch.manual_seed(1)
    gpo = create_pooling("gpo", dim=4).eval()
    _, w1 = gpo(_tokens(B=1, N=5, D=4, seed=1), return_weights=True)
    _, w2 = gpo(_tokens(B=1, N=5, D=4, seed=2), return_weights=True)
    torch.testing.assert_close(w1, w2)
    # sorted features: the result equals sum_k w_k * sorted_k per dimension
    x = _tokens(B=1, N=5, D=4, seed=3)
    expected = (x.sort(dim=1, descending=True).values * w1.unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(gpo(x), expected)


def test_gpo_odd_pe_dim_is_config_error() -> None:
    from xmodal.errors import ConfigError

    gpo = create_pooling("gpo", d_pe=31)
    with pytest.raises(ConfigError):
        gpo(_tokens())


def test_unknown_head_lists_choices() -> None:
    from xmodal.errors import XmodalError

    with pytest.raises(XmodalError, match="gpo"):
        create_pooling("nope")
