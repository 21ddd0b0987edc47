"""SDE noise on a GPU: the same per-sample stream as on the CPU (needs CUDA; skipped without it)."""

from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.noise import PerSampleNoiseSampler

pytestmark = pytest.mark.gpu


def test_noise_is_bitwise_the_same_on_cpu_and_cuda():
    x = torch.zeros(3, 4, 16, 16)
    cpu, gpu = PerSampleNoiseSampler(x, seed=42), PerSampleNoiseSampler(x.cuda(), seed=42)
    for _ in range(3):
        a, b = cpu(1.0, 0.5), gpu(1.0, 0.5)
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu())


def test_sde_sample_matches_between_cpu_and_cuda():
    """SDE-DPM-Solver++(2M) with a linear model: only float rounding differs between devices."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = torch.tensor([14.6, 5.0, 2.0, 0.8, 0.3, 0.0])

    def model(v, sigma, **extra):
        return v / (1.0 + sigma.reshape(-1, 1, 1, 1) ** 2)

    out = {device: sample_dpmpp_multistep(model, x.to(device), sigmas.to(device), {"seed": 7}, order=2, eta=1.0,
                                          disable=True, resume_history=False) for device in ("cpu", "cuda")}
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"], rtol=1e-5, atol=1e-5)
