"""CUDA-graph replay on a real GPU: parity with eager, recapture rules, failure clean-up, memory.

The first group drives ``GraphedForward`` with the real ``CudaGraphBackend`` on a small
conv + attention network. The second runs the benchmark script's correctness suite on random-
weight SD1.5 and SDXL-architecture UNets in real ComfyUI (in a subprocess, because ComfyUI
must start in GPU mode while the other ComfyUI tests start it in CPU mode).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_fewstep.cuda_graph import CudaGraphBackend, GraphedForward, parameter_fingerprint

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


class Block(torch.nn.Module):
    """Conv, GroupNorm, self-attention through SDPA, linear: the op mix of a UNet level."""

    def __init__(self, ch: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.conv = torch.nn.Conv2d(4, ch, 3, padding=1)
        self.norm = torch.nn.GroupNorm(32, ch)
        self.qkv = torch.nn.Linear(ch, 3 * ch)
        self.proj = torch.nn.Linear(ch, ch)
        self.out = torch.nn.Conv2d(ch, 4, 3, padding=1)
        self.ctx = torch.nn.Linear(32, ch)

    def forward(self, tree: dict) -> torch.Tensor:
        x, t, ctx = tree["x"], tree["timesteps"], tree["context"]
        h = torch.nn.functional.silu(self.norm(self.conv(x))) + (t.view(-1, 1, 1, 1) * 1e-3).to(x.dtype)
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2) + self.ctx(ctx).mean(1, keepdim=True)
        q, k, v = self.qkv(seq).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        h = h + self.proj(a).transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(h)


def tree(batch: int = 2, size: int = 32, seed: int = 0, dtype=torch.float16) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "x": torch.randn(batch, 4, size, size, device="cuda", generator=g, dtype=dtype),
        "timesteps": torch.rand(batch, device="cuda", generator=g) * 999,
        "context": torch.randn(batch, 77, 32, device="cuda", generator=g, dtype=dtype),
    }


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block().cuda().half().eval()


def test_replay_matches_eager_and_reuses_the_graph(block):
    gf = GraphedForward(CudaGraphBackend(), warmup=2, verify=True)
    with torch.inference_mode():
        for seed in range(5):
            out = gf(block, tree(seed=seed), device="cuda", weights=parameter_fingerprint(block))
            torch.testing.assert_close(out, block(tree(seed=seed)), rtol=1e-3, atol=1e-3)
    assert gf.stats.captures == 1 and gf.stats.replays == 5 and gf.stats.verify_failures == 0


def test_replaced_weights_are_recaptured(block):
    gf = GraphedForward(CudaGraphBackend(), verify=True)
    with torch.inference_mode():
        gf(block, tree(), device="cuda", weights=parameter_fingerprint(block))
        block.out.weight = torch.nn.Parameter(block.out.weight.detach() * 2.0)
        out = gf(block, tree(seed=1), device="cuda", weights=parameter_fingerprint(block))
        torch.testing.assert_close(out, block(tree(seed=1)), rtol=1e-3, atol=1e-3)
    assert gf.stats.captures == 2 and gf.stats.invalidations == 1


def test_host_sync_in_forward_falls_back_and_frees(block, caplog):
    def syncing(t):
        if t["timesteps"][0].item() > -1:  # a host sync: illegal while capturing
            return block(t)
        return block(t)

    gf = GraphedForward(CudaGraphBackend(), warmup=1)
    with torch.inference_mode():
        gf(block, tree(), device="cuda")  # settle the allocator with one ordinary graph
        gf.release_all(torch.device("cuda"))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with caplog.at_level(logging.WARNING):
            for seed in range(3):
                out = gf(syncing, tree(seed=seed), device="cuda")
                torch.testing.assert_close(out, block(tree(seed=seed)), rtol=0, atol=0)
        del out
        torch.cuda.synchronize()
    assert gf.stats.capture_failures == 1
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024


def test_memory_is_bounded(block):
    gf = GraphedForward(CudaGraphBackend(), max_graphs=2, verify=False)
    with torch.inference_mode():
        gf(block, tree(), device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for seed in range(100):  # 100 prompts, one signature
            gf(block, tree(seed=seed), device="cuda")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base < 1024 * 1024 and gf.stats.captures == 1
        reserved = []
        for _ in range(3):  # six signatures through a two-graph cache
            for size in (16, 24, 32, 40, 48, 56):
                gf(block, tree(size=size), device="cuda")
            torch.cuda.synchronize()
            reserved.append(torch.cuda.memory_reserved())
        assert len(gf.cache) == 2 and gf.stats.captures == 1 + 18
        assert reserved[2] <= reserved[0] * 1.1


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.parametrize(("case", "prompts"), [("sd15-512-b2", 100), ("sdxl-1024-b2", 10)])
def test_comfy_unets(case, prompts, tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "cuda_graph_benchmark.py"), "--check", "--cases", case,
           "--steps", "4", "--prompts", str(prompts), "--json", str(out)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=dict(os.environ), timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(out.read_text())["check"][case]
    assert r["graph_vs_eager_rel_error"] <= 1e-3
    assert r["captures_first_run"] >= 1
    assert r["captures_after_new_prompts"] == r["captures_first_run"]  # no recapture: prompt and seed only
    assert r["captures_after_lora"] == r["captures_first_run"] + 1 and r["lora_invalidations"] >= 1
    assert r["lora_graph_vs_eager_rel_error"] <= 1e-3 and r["lora_changed_output"]
    assert r["memory_growth_over_prompts_bytes"] < 64 * 2**20
    assert r["cached_graphs_after_size_sweep"] <= 2
