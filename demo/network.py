"""A tiny pixel-space denoiser: a small conv UNet behind EDM preconditioning.

The preconditioning follows Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM, arXiv 2206.00364), Table 1 / eq. 7:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4

so ``EDMDenoiser(x, sigma)`` is a data prediction in the VE form ``x = x0 + sigma eps``
(the sampler contract of :mod:`..samplers`). The raw network ``F`` is a three-level
UNet with one residual block per level and a Fourier embedding of ``c_noise``; at
16x16 and 32 base channels it has about 0.3 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["EDMDenoiser", "TinyUNet", "TinyUNetConfig", "edm_coefficients"]


@dataclass(frozen=True)
class TinyUNetConfig:
    """Architecture and preconditioning of the tiny teacher (stored with its weights as JSON)."""

    resolution: int = 16                      # image side in pixels (square images)
    channels: int = 1                         # image channels
    base_channels: int = 32                   # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # per level; each level after the first halves the side
    emb_dim: int = 128                        # width of the noise embedding
    fourier_dim: int = 32                     # sin/cos features of c_noise
    groups: int = 8                           # GroupNorm groups
    sigma_data: float = 0.5                   # expected std of the data (EDM sigma_data)
    sigma_min: float = 0.002                  # noise range the sampler should use
    sigma_max: float = 80.0
    extra: dict = field(default_factory=dict)  # free-form provenance (dataset, training command)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TinyUNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TinyUNetConfig keys {unknown}; allowed: {sorted(known)}")
        data = dict(data)
        if "channel_mult" in data:
            data["channel_mult"] = tuple(int(m) for m in data["channel_mult"])
        return cls(**data)


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM (Karras et al. 2022, Table 1) for each sigma."""
    sigma = sigma.to(torch.float32)
    total = sigma.square() + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = total.rsqrt()
    c_noise = sigma.clamp_min(1e-20).log() / 4
    return c_skip, c_out, c_in, c_noise


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding as a scale/shift after the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(groups, c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * c_out)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv1(h)


class TinyUNet(nn.Module):
    """The raw network ``F(x_in, c_noise)`` of EDM: a small UNet, one block per level."""

    def __init__(self, config: TinyUNetConfig) -> None:
        super().__init__()
        self.config = config
        c, g, e = config.base_channels, config.groups, config.emb_dim
        widths = [c * m for m in config.channel_mult]
        half = config.fourier_dim // 2
        self.register_buffer(
            "freqs", torch.exp(torch.linspace(0.0, math.log(100.0), half)), persistent=False
        )
        self.emb = nn.Sequential(nn.Linear(config.fourier_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(config.channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = widths[0]
        for w in widths:
            self.down.append(_ResBlock(prev, w, e, g))
            prev = w
        self.mid = _ResBlock(prev, prev, e, g)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_ResBlock(prev + w, w, e, g))
            prev = w
        self.norm_out = nn.GroupNorm(g, prev)
        self.conv_out = nn.Conv2d(prev, config.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.freqs[None, :]
        emb = self.emb(torch.cat([angles.cos(), angles.sin()], dim=1))
        h = self.conv_in(x)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for level, block in enumerate(self.up):
            if level > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDenoiser(nn.Module):
    """``D(x; sigma)`` of EDM (Karras et al. 2022, eq. 7) around a :class:`TinyUNet`.

    Call as ``denoiser(x, sigma)`` with ``x`` of shape ``(B, C, H, W)`` and ``sigma`` a
    scalar or a ``(B,)`` tensor; returns the denoised ``x0`` in ``x``'s dtype. This is
    the model contract of :mod:`..samplers` (VE form, ``x = x0 + sigma * eps``).
    """

    def __init__(self, config: TinyUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.sigma_data = float(config.sigma_data)
        self.sigma_min = float(config.sigma_min)
        self.sigma_max = float(config.sigma_max)
        self.net = TinyUNet(config)

    def forward(self, x: Tensor, sigma: Tensor | float, **_: object) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.channels:
            raise ValueError(
                f"expected x of shape (B, {self.config.channels}, H, W), got {tuple(x.shape)}"
            )
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        coefficients = edm_coefficients(sigma, self.sigma_data)
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in coefficients)
        x32 = x.to(torch.float32)
        net_dtype = self.net.conv_in.weight.dtype
        F_x = self.net((c_in * x32).to(net_dtype), c_noise.reshape(-1).to(net_dtype)).to(torch.float32)
        return (c_skip * x32 + c_out * F_x).to(x.dtype)
