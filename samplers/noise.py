"""Per-step noise for the SDE samplers: seeded per sample, independent of batch size and device.

Sample ``i`` of a batch draws from its own CPU generator seeded with a SplitMix64 mix of
``(seed, i)``, and the draws are moved to the sampling device. So sample ``i`` gets the same
noise in a batch of 1 or of 8, and the same on CPU and GPU (CPU ``torch.randn`` is the
reference stream), at the cost of one small host-to-device copy per step.
"""

from __future__ import annotations

import random

import torch

__all__ = ["PerSampleNoiseSampler", "sample_seed"]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """SplitMix64 mix of ``(seed, index)`` into a 63-bit generator seed (Steele et al. 2014)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class PerSampleNoiseSampler:
    """Callable ``(sigma, sigma_next) -> noise`` shaped like ``x``; standard normal per element.

    Args:
        x: a tensor with the batch's shape, device and dtype.
        seed: the run's seed (ComfyUI passes it as ``extra_args["seed"]``); ``None`` draws one.
        first_index: batch index of ``x[0]`` (for a batch split across calls).
    """

    def __init__(self, x: torch.Tensor, seed: int | None, first_index: int = 0) -> None:
        self.seed = random.getrandbits(63) if seed is None else int(seed)
        self.shape = tuple(x.shape[1:])
        self.device, self.dtype = x.device, x.dtype
        self.generators = []
        for i in range(x.shape[0]):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(sample_seed(self.seed, first_index + i))
            self.generators.append(gen)

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=self.device, dtype=self.dtype, non_blocking=True)
