"""Conditional generator and discriminator for 64x64 synthesis from a shared embedding.

Follows the StackGAN stage-I design that X-MRS's synthesis builds on: the embedding goes
through *conditioning augmentation* (``c = mu(e) + sigma(e) * eps``, with a KL term to a
unit Gaussian, so that nearby embeddings give nearby images), is concatenated with noise
``z`` and upsampled 4 -> 64 px by nearest-neighbour upsampling + 3x3 convolutions. The
discriminator is conditional by projection (Miyato & Koyama, 2018): a spectrally
normalised convolutional trunk, an unconditional logit plus the inner product of its
features with a linear map of the embedding. Trained matching-aware (GAN-CLS): a real image
with another sample's embedding counts as fake.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class CondAugment(nn.Module):
    """Embedding ``(B, E)`` -> ``(c, mu, logvar)``, each ``(B, C)``."""

    def __init__(self, embed_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, 2 * cond_dim)
        # embeddings are unit vectors: rescale to unit-variance components, so that mu starts
        # on the scale of the unit-variance noise instead of ~30x below it (which left the
        # generator unconditional for hundreds of steps)
        self.scale = float(embed_dim) ** 0.5

    def forward(self, e: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        mu, logvar = F.leaky_relu(self.fc(e * self.scale), 0.2).chunk(2, dim=-1)  # (B, C) each
        if noise is None:  # deterministic synthesis: the mean condition
            return mu, mu, logvar
        return mu + noise * torch.exp(0.5 * logvar), mu, logvar


def kl_to_unit_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.mean(torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=-1))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConditionalGenerator(nn.Module):
    """``G(e, z)``: embedding ``(B, E)`` + noise ``(B, Z)`` -> image ``(B, 3, 64, 64)`` in [-1, 1]."""

    def __init__(self, embed_dim: int, z_dim: int = 64, cond_dim: int = 64, base: int = 16) -> None:
        super().__init__()
        self.embed_dim, self.z_dim, self.cond_dim, self.base = embed_dim, z_dim, cond_dim, base
        self.ca = CondAugment(embed_dim, cond_dim)
        self.fc = nn.Sequential(nn.Linear(cond_dim + z_dim, base * 8 * 4 * 4, bias=False),
                                nn.BatchNorm1d(base * 8 * 4 * 4), nn.ReLU(inplace=True))
        self.ups = nn.Sequential(_up(base * 8, base * 4), _up(base * 4, base * 2), _up(base * 2, base),
                                 _up(base, base))
        self.out = nn.Conv2d(base, 3, 3, padding=1)

    def forward(self, e: torch.Tensor, z: torch.Tensor, ca_noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(images (B, 3, 64, 64), mu, logvar)``."""
        c, mu, logvar = self.ca(e, ca_noise)
        h = self.fc(torch.cat([c, z], dim=-1))  # (B, 8b * 16)
        h = h.view(-1, self.base * 8, 4, 4)  # (B, 8b, 4, 4)
        h = self.ups(h)  # (B, b, 64, 64)
        return torch.tanh(self.out(h)), mu, logvar


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True))


class ProjectionDiscriminator(nn.Module):
    """``D(x, e)``: image ``(B, 3, 64, 64)`` + embedding ``(B, E)`` -> logit ``(B,)``."""

    def __init__(self, embed_dim: int, base: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_down(3, base), _down(base, base * 2), _down(base * 2, base * 4),
                                   _down(base * 4, base * 8))  # 64 -> 4 px
        feat = base * 8 * 4 * 4
        self.linear = spectral_norm(nn.Linear(feat, 1))
        self.embed = spectral_norm(nn.Linear(embed_dim, feat, bias=False))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).flatten(1)  # (B, 8b * 16)
        return self.linear(h).squeeze(-1) + (self.embed(e) * h).sum(dim=-1)  # (B,)
