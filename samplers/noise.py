"""Per-step noise for the SDE samplers: seeded per sample, independent of batch size and device.

Sample ``i`` of a batch draws from its own CPU generator seeded with a SplitMix64 mix of
``(seed, i)``, and the draws are moved to the sampling device. So sample ``i`` gets the same
noise in a batch of 1 or of 8, and the same on CPU and GPU (CPU ``torch.randn`` is the
reference stream), at the cost of one small host-to-device copy per step.

A draw for the step from ``sigma`` is keyed by ``sigma`` too (its float64 bits mixed into the
sample's seed), not by the step's position in the run: a schedule split into parts sampled with
the same seed (SplitSigmas, a refiner hand-off) draws, in each part, the noise the unsplit run
draws at the same sigmas, instead of replaying the first part's noise in the second.
"""
from __future__ import annotations

import random
import struct

import torch

__all__ = ["PerSampleNoiseSampler", "sample_seed"]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """SplitMix64 mix of ``(seed, index)`` into a 63-bit generator seed (Steele et al. 2014)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _float_bits(value: float) -> int:
    """The IEEE-754 float64 bits of ``value`` as an integer."""
    return struct.unpack("<Q", struct.pack("<d", float(value)))[0]


class PerSampleNoiseSampler:
    """Callable ``(sigma, sigma_next) -> noise`` shaped like ``x``; standard normal per element.

    With ``sigma`` given, sample ``i``'s draw is seeded by ``(seed, i, sigma)``: the same at the
    same noise level in any run with this seed. Called without it, each sample continues its own
    ``(seed, i)`` stream.

    Args:
        x: a tensor with the batch's shape, device and dtype.
        seed: the run's seed (ComfyUI passes it as ``extra_args["seed"]``); ``None`` draws one.
        first_index: batch index of ``x[0]`` (for a batch split across calls).
    """

    def __init__(self, x: torch.Tensor, seed: int | None, first_index: int = 0) -> None:
        self.seed = random.getrandbits(63) if seed is None else int(seed)
        self.shape = tuple(x.shape[1:])
        self.device, self.dtype = x.device, x.dtype
        self.sample_seeds = [sample_seed(self.seed, first_index + i) for i in range(x.shape[0])]
        self.generators = []
        for s in self.sample_seeds:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(s)
            self.generators.append(gen)

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        if sigma is not None:
            key = _float_bits(sigma)
            for gen, s in zip(self.generators, self.sample_seeds):
                gen.manual_seed(sample_seed(s, key))
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=self.device, dtype=self.dtype, non_blocking=True)
