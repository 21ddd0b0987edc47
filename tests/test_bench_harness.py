"""The benchmark's paired flip measures: McNemar's exact test and the change in the mix of components."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from comfyui_fewstep.samplers.analytic import GaussianMixture


@pytest.fixture(scope="module")
def problem():
    """Three narrow, well separated components; the reference has 4 samples in each."""
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    mixture = GaussianMixture(means, torch.full((3,), 0.1, dtype=torch.float64), torch.full((3,), 1 / 3))
    labels = torch.arange(3).repeat_interleave(4)
    return SimpleNamespace(mixture=mixture, reference_component=labels, means=means)


def _outputs(problem, labels: list[int]) -> torch.Tensor:
    """Nearest components of outputs placed just off the given components' means."""
    return problem.mixture.nearest_component(problem.means[torch.tensor(labels)] + 0.01)


def test_swapped_components_keep_the_mix(bench_harness, problem):
    """Two samples that trade components are two flips but leave the proportions as they were."""
    labels = problem.reference_component.tolist()
    labels[0], labels[4] = labels[4], labels[0]
    assert bench_harness.composition_distance(problem, _outputs(problem, labels)) == pytest.approx(0.0)
    unchanged = _outputs(problem, problem.reference_component.tolist())
    assert bench_harness.composition_distance(problem, unchanged) == 0.0


def test_changes_one_way_move_the_mix_by_the_flip_rate(bench_harness, problem):
    """k of n samples all leaving component 0 for component 2: the distance is k / n, the flip rate."""
    labels = problem.reference_component.tolist()
    labels[0] = labels[1] = labels[2] = 2
    assert bench_harness.composition_distance(problem, _outputs(problem, labels)) == pytest.approx(3 / 12)


def test_mcnemar_exact_p(bench_harness):
    """Discordant pairs 10 / 0: two-sided p = 2 / 2^10; 3 / 3 is chance (p = 1); samples that change
    component with both do not count."""
    def result(flags: list[bool]):
        return SimpleNamespace(changed=torch.tensor(flags))

    ours = result([True] * 10 + [True, False])
    other = result([False] * 10 + [True, False])
    assert bench_harness.paired_flips(ours, other) == (10, 0, pytest.approx(2 / 2**10))
    a, b, p = bench_harness.paired_flips(result([True] * 3 + [False] * 3), result([False] * 3 + [True] * 3))
    assert (a, b) == (3, 3) and p == 1.0
    # 7 / 1: P(X <= 1) for Binomial(8, 1/2) is 9 / 256, doubled
    _, _, p = bench_harness.paired_flips(result([True] * 7 + [False]), result([False] * 7 + [True]))
    assert p == pytest.approx(2 * 9 / 256)
    with pytest.raises(ValueError, match="per trajectory"):
        bench_harness.paired_flips(SimpleNamespace(changed=None), other)
    assert math.isnan(bench_harness.Result("p", "ours", "m", "s", 5, 5, 0.1, 0.2, 0.0).composition)
