"""LCM's guidance-scale embedding (Luo et al. 2023, Sec. 4.2 "w-conditioned"): full LCM UNets
(LCM_Dreamshaper_v7, ``time_cond_proj_dim`` 256) add ``cond_proj(emb(w - 1))`` to the timestep
embedding input. The LDM UNet has no slot for it, so ComfyUI drops the weight; this module puts it
back around the UNet's ``time_embed``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GuidedTimeEmbedding", "guidance_scale_embedding"]


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 w`` (diffusers ``get_guidance_scale_embedding``; LCM passes
    ``w = guidance_scale - 1``): ``[sin(1000 w f_k), cos(1000 w f_k)]``, ``f_k = 10000^(-k/(half-1))``."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class GuidedTimeEmbedding(nn.Module):
    """``time_embed(t_emb + cond_proj(guidance_scale_embedding(w - 1)))`` — diffusers
    ``TimestepEmbedding.forward`` with ``condition``, around an LDM ``time_embed`` Sequential."""

    def __init__(self, time_embed: nn.Module, cond_proj_weight: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.time_embed = time_embed
        self.cond_proj = nn.Linear(cond_proj_weight.shape[1], cond_proj_weight.shape[0], bias=False)
        with torch.no_grad():
            self.cond_proj.weight.copy_(cond_proj_weight.float())
        self.guidance_scale = float(guidance_scale)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        w = torch.full((t_emb.shape[0],), self.guidance_scale - 1.0, device=t_emb.device)
        cond = self.cond_proj.to(t_emb.device)(guidance_scale_embedding(w, self.cond_proj.in_features))
        return self.time_embed(t_emb + cond.to(t_emb.dtype))
