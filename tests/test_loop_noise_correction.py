"""Shared loop helpers, per-sample noise and x0 corrections."""

from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.samplers._loop import ModelEvaluator, NonFiniteModelOutputError, sigma_list
from comfyui_fewstep.samplers.correction import dynamic_threshold, make_x0_correction
from comfyui_fewstep.samplers.noise import PerSampleNoiseSampler


def test_noise_is_per_sample_and_batch_size_independent():
    x8 = torch.zeros(8, 3, 4, 4)
    big, small = PerSampleNoiseSampler(x8, seed=123), PerSampleNoiseSampler(x8[2:3], seed=123, first_index=2)
    for _ in range(3):
        a, b = big(), small()
        assert torch.equal(a[2:3], b)
    assert not torch.equal(a[0], a[1])
    other = PerSampleNoiseSampler(x8, seed=124)()
    assert not torch.allclose(other, big())


def test_noise_statistics_and_dtype():
    x = torch.zeros(4, 64, 64, dtype=torch.float64)
    n = PerSampleNoiseSampler(x, seed=0)()
    assert n.dtype == torch.float64 and n.shape == x.shape
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1.0) < 0.02


def test_evaluator_counts_and_stops_on_nan():
    calls = []

    def model(x, sigma):
        calls.append(sigma.clone())
        return torch.full_like(x, float("nan")) if len(calls) == 2 else x * 0.5

    ev = ModelEvaluator(model, total_steps=5)
    x = torch.ones(2, 3)
    assert torch.equal(ev(x, 2.0, 0), x * 0.5) and ev.nfe == 1
    assert torch.equal(calls[0], torch.tensor([2.0, 2.0]))
    with pytest.raises(NonFiniteModelOutputError, match="step 2 of 5"):
        ev(x, 1.0, 1)


def test_sigma_list_validation():
    assert sigma_list(torch.tensor([2.0, 1.0, 0.0])) == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        sigma_list(torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        sigma_list(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="14.6146 appears twice in a row.*Use fewer steps"):
        sigma_list(torch.tensor([14.6146, 14.6146, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative and finite"):  # not a model call at sigma = nan later
        sigma_list(torch.tensor([float("inf"), 10.0, 1.0, 0.0]))


def _solver(name: str, n_steps: int):
    """A solver's entry point by name; the fitted one with zero coefficients for ``n_steps`` steps."""
    from comfyui_fewstep.samplers import (sample_dpmpp_adaptive, sample_dpmpp_multistep,
                                          sample_dpmpp_singlestep)
    from comfyui_fewstep.samplers.fitted import regressor_count, sample_fitted_multistep

    if name == "fitted":
        zeros = [[0.0] * regressor_count(n, n_steps) for n in range(n_steps)]
        return lambda *a, **k: sample_fitted_multistep(*a, coefficients=zeros, **k)
    return {"multistep": sample_dpmpp_multistep, "singlestep": sample_dpmpp_singlestep,
            "adaptive": sample_dpmpp_adaptive}[name]


@pytest.mark.parametrize("solver", ["multistep", "singlestep", "adaptive", "fitted"])
def test_every_solver_refuses_a_ve_schedule_on_a_flow_model(solver):
    """lambda(sigma >= 1) is -inf on a flow model: a VE schedule would run as steps from sigma = 1
    and give a finite but wrong sample, so every solver stops with the same message."""
    from comfyui_fewstep.samplers import for_family

    run = _solver(solver, n_steps=2)
    flow = for_family("flow")
    with pytest.raises(ValueError, match="flow model's sigmas lie in"):
        run(lambda x, s, **k: 0.5 * x, torch.randn(1, 3), torch.tensor([14.6, 0.5, 0.0]), parameterization=flow,
            disable=True)
    out = run(lambda x, s, **k: 0.5 * x, torch.randn(1, 3), torch.tensor([1.0, 0.5, 0.0]), parameterization=flow,
              disable=True)
    assert torch.isfinite(out).all()


def test_dynamic_threshold_matches_definition():
    torch.manual_seed(0)
    x0 = torch.randn(3, 1000) * torch.tensor([[0.5], [2.0], [5.0]])
    out = dynamic_threshold(x0, percentile=0.9, max_value=1.0)
    for i in range(3):
        s = max(float(torch.quantile(x0[i].abs(), 0.9)), 1.0)
        expected = x0[i].clamp(-s, s) / s
        assert torch.allclose(out[i], expected, atol=1e-6)
    inside = x0[0].abs() <= 1.0  # s = 1 for the narrow sample: values inside [-1, 1] are untouched
    assert torch.equal(out[0][inside], x0[0][inside])
    assert float(out.abs().max()) <= 1.0 + 1e-6


def test_make_x0_correction():
    assert make_x0_correction("none") is None
    clamp = make_x0_correction("clamp", max_value=2.0)
    assert torch.equal(clamp(torch.tensor([-3.0, 1.0, 5.0]), 1.0), torch.tensor([-2.0, 1.0, 2.0]))
    with pytest.raises(ValueError):
        make_x0_correction("bogus")


@pytest.mark.parametrize("kind", ["clamp", "dynamic_threshold"])
def test_x0_correction_keeps_the_inpainting_region(kind):
    """With a denoise mask, ComfyUI has already put the kept latent (mask 0) into the prediction;
    the correction applies only where the model generates (it used to rescale the kept pixels)."""
    torch.manual_seed(0)
    kept = torch.rand(2, 3, 8, 8) * 3.0 - 1.5  # partly outside [-1, 1], as a latent can be
    generated = torch.randn(2, 3, 8, 8) * 2.0
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0
    prediction = generated * mask + kept * (1.0 - mask)
    correction = make_x0_correction(kind, percentile=0.9)
    evaluator = ModelEvaluator(lambda x, s, **extra: prediction, {"denoise_mask": mask}, correction, 1)
    out = evaluator(torch.zeros(2, 3, 8, 8), 1.0, 0)
    region = mask.expand_as(out).bool()
    assert torch.equal(out[~region], kept[~region])
    assert torch.allclose(out[region], correction(prediction, 1.0)[region])
    assert not torch.equal(out[region], prediction[region])


@pytest.mark.parametrize("solver", ["multistep", "singlestep"])
def test_a_schedule_too_short_for_the_order_is_lowered_and_logged(solver, caplog):
    """Order 3 with one step runs at first order (the documented lowering) and says so; a long
    enough schedule logs nothing."""
    import logging

    from comfyui_fewstep.samplers import sample_dpmpp_multistep, sample_dpmpp_singlestep

    run = sample_dpmpp_multistep if solver == "multistep" else sample_dpmpp_singlestep
    model = lambda x, s, **k: 0.5 * x  # noqa: E731
    with caplog.at_level(logging.INFO, logger="comfyui_fewstep.samplers._loop"):
        one = run(model, torch.ones(1, 3), torch.tensor([2.0, 0.0]), order=3, disable=True)
    assert "1 step(s) reach order 1 at most, not 3" in caplog.text
    # one first-order step to 0 returns the data prediction
    torch.testing.assert_close(one, torch.full((1, 3), 0.5))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comfyui_fewstep.samplers._loop"):
        run(model, torch.ones(1, 3), torch.tensor([2.0, 1.0, 0.5, 0.25, 0.12, 0.06, 0.0]), order=3, disable=True)
    assert "reach order" not in caplog.text


@pytest.mark.parametrize("solver", ["multistep", "singlestep", "adaptive", "fitted"])
def test_progress_bar_follows_disable(solver, capsys):
    """ComfyUI passes ``disable`` to hide the console bar (its own progress goes through
    ``callback``): nothing is written when it is set, and the step bar appears when it is not."""
    pytest.importorskip("tqdm")
    run = _solver(solver, n_steps=3)
    sigmas = torch.tensor([14.6, 2.0, 0.5, 0.0], dtype=torch.float64)
    capsys.readouterr()
    run(lambda x, s, **k: 0.5 * x, torch.randn(1, 3), sigmas, disable=True)
    assert capsys.readouterr().err == ""
    run(lambda x, s, **k: 0.5 * x, torch.randn(1, 3), sigmas, disable=False)
    shown = capsys.readouterr().err
    # the adaptive solver's step count is not known in advance: it reports through callback only
    assert ("3/3" in shown) if solver != "adaptive" else shown == ""
