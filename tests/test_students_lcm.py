"""LCM guidance embedding against diffusers' TimestepEmbedding(cond_proj) and guidance-scale embedding."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_fewstep.distill_loaders.lcm_guidance import GuidedTimeEmbedding, guidance_scale_embedding


def test_embedding_closed_form():
    emb = guidance_scale_embedding(torch.tensor([7.0]), 8)
    f = [10000 ** (-k / 3) for k in range(4)]
    expected = [math.sin(7000 * x) for x in f] + [math.cos(7000 * x) for x in f]
    torch.testing.assert_close(emb[0], torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert guidance_scale_embedding(torch.tensor([0.0, 1.0]), 5).shape == (2, 5)


def test_matches_diffusers_timestep_embedding():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import TimestepEmbedding

    torch.manual_seed(0)
    ref = TimestepEmbedding(32, 128, cond_proj_dim=16)
    seq = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128))
    seq[0].load_state_dict(ref.linear_1.state_dict())
    seq[2].load_state_dict(ref.linear_2.state_dict())
    ours = GuidedTimeEmbedding(seq, ref.cond_proj.weight.detach(), guidance_scale=8.0)
    t_emb = torch.randn(3, 32)
    w = torch.full((3,), 7.0)  # LCM pipeline: guidance_scale - 1
    pipe = diffusers.LatentConsistencyModelPipeline
    w_emb = pipe.get_guidance_scale_embedding(None, w, embedding_dim=16)
    torch.testing.assert_close(ours(t_emb), ref(t_emb, condition=w_emb), rtol=1e-5, atol=1e-5)
