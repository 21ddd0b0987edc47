"""Schedules: the SIGMAS contract, closed forms, published tables, denoise and input errors."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from comfyui_fewstep.samplers import schedules as S
from comfyui_fewstep.samplers._loop import sigma_list
from comfyui_fewstep.samplers.parameterization import (
    Parameterization,
    discrete_vp_sigmas,
    flow_sigmas,
    for_family,
)

SD15 = discrete_vp_sigmas()  # float64, ascending, index = UNet timestep
EPS = for_family("eps")
EDM = for_family("edm")
FLOW = for_family("flow")
FLOW3 = for_family("flow", timestep_sigmas=flow_sigmas(1000, shift=3.0))

# Align Your Steps, 10 steps (NVIDIA project page "How to use AYS", full precision of Table 3)
AYS_SD15 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
AYS_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
            0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]
AYS_SVD = [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]

SCHEDULES_FOR = {
    "eps": [n for n in S.SCHEDULE_NAMES if n != "custom"],
    "edm": ["logsnr_uniform", "logsnr_window", "time_uniform", "time_quadratic", "karras", "exponential",
            "polyexponential"],
    "flow": ["logsnr_uniform", "logsnr_window", "time_uniform", "time_quadratic", "karras", "exponential",
             "polyexponential"],
}
PARAMS = {"eps": EPS, "edm": EDM, "flow": FLOW}


def lam(p: Parameterization, sigmas: torch.Tensor) -> np.ndarray:
    return np.array([p.lambda_(float(s)) for s in sigmas])


def test_names_and_defaults_are_one_source_of_truth():
    assert S.SCHEDULE_NAMES == ("logsnr_uniform", "logsnr_window", "time_uniform", "time_quadratic", "karras",
                                "exponential", "polyexponential", "ays", "gits", "custom")
    assert tuple(S.SCHEDULE_DEFAULTS) == S.SCHEDULE_NAMES
    for name, defaults in S.SCHEDULE_DEFAULTS.items():
        sig = inspect.signature(getattr(S, f"get_sigmas_{name}"))
        for key, value in defaults.items():
            assert sig.parameters[key].default == value, (name, key)
        assert "sigma_min" in sig.parameters and "sigma_max" in sig.parameters


@pytest.mark.parametrize("family", ["eps", "edm", "flow"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 25, 60])
def test_sigmas_contract(family, steps):
    p = PARAMS[family]
    for name in SCHEDULES_FOR[family]:
        s = S.get_sigmas(name, steps, p)
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.dim() == 1, name
        assert s.numel() == steps + 1, name
        assert s[-1].item() == 0.0, name
        assert bool((s[:-1] > s[1:]).all()), (name, s)
        assert s[0].item() == pytest.approx(p.sigma_max, rel=1e-3), name
        if name not in ("ays", "gits"):
            assert s[0].item() == np.float32(p.sigma_max), name
        assert s[-2].item() >= p.sigma_min * (1 - 1e-6), name


# -- logsnr_window ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [EDM, FLOW, FLOW3])
@pytest.mark.parametrize("steps", [2, 5, 8])
def test_logsnr_window_is_uniform_in_lambda_between_its_window_ends(p, steps):
    s = S.get_sigmas("logsnr_window", steps, p)
    grid = lam(p, s[1:-1])  # the points after the stretched first step
    start = S.SCHEDULE_DEFAULTS["logsnr_window"]["lambda_start"]
    lam_end = -math.log(0.02)
    h = (lam_end - start) / steps
    expected = start + h * np.arange(1, steps)
    np.testing.assert_allclose(grid, expected, atol=2e-5)
    assert s[0].item() == np.float32(p.sigma_max) and s[-1].item() == 0.0


def test_logsnr_window_never_calls_the_model_below_its_sigma_min():
    # SD1.5 (sigma_min 0.0292): with few steps the last call, one step above sigma_end = 0.02, is
    # above sigma_min; from 16 steps on it would not be, and the grid is stretched to end there
    lam_floor = EPS.lambda_(EPS.sigma_min)
    start = -2.0  # above lambda(sigma_max) = -2.68
    for steps in (5, 8, 15):
        s = S.get_sigmas("logsnr_window", steps, EPS, lambda_start=start)
        h = (-math.log(0.02) - start) / steps
        last = EPS.lambda_(s[-2].item())
        assert last == pytest.approx(-math.log(0.02) - h, abs=2e-5) and last < lam_floor
    for steps in (16, 20, 40):
        s = S.get_sigmas("logsnr_window", steps, EPS, lambda_start=start)
        assert s[-2].item() == pytest.approx(EPS.sigma_min, rel=1e-5)
        h = (lam_floor - start) / (steps - 1)
        np.testing.assert_allclose(lam(EPS, s[1:-1]), start + h * np.arange(1, steps), atol=2e-5)


def test_logsnr_window_with_the_full_range_is_logsnr_uniform():
    s = S.get_sigmas("logsnr_window", 7, EDM, lambda_start=-10.0, sigma_end=EDM.sigma_min)
    torch.testing.assert_close(s, S.get_sigmas("logsnr_uniform", 7, EDM), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("options", [{"lambda_start": 5.0}, {"sigma_end": 0.0}, {"lambda_start": math.nan},
                                     {"sigma_end": 2.0, "lambda_start": 0.0}])
def test_logsnr_window_rejects_an_empty_window(options):
    with pytest.raises(ValueError, match="logsnr_window"):
        S.get_sigmas("logsnr_window", 5, EDM, **options)


# -- logsnr_uniform ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [EPS, EDM, Parameterization("ve", 0.01, 50.0, "eps")])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_logsnr_uniform_ve_has_equal_lambda_gaps(p, steps):
    s = S.get_sigmas_logsnr_uniform(steps, p)
    h = (p.lambda_max - p.lambda_min) / steps
    grid = lam(p, s.double()[:-1])
    assert np.allclose(np.diff(grid), h, rtol=1e-5, atol=1e-6)
    assert grid[0] == pytest.approx(p.lambda_min, abs=1e-6)
    # VE: lambda = -log sigma, so the schedule is log-linear in sigma
    assert np.allclose(np.diff(np.log(s.double()[:-1].numpy())), -h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 4, 8, 20])
def test_logsnr_uniform_flow_clips_the_noisy_end(steps):
    s = S.get_sigmas_logsnr_uniform(steps, FLOW).double()
    assert s[0].item() == 1.0  # still starts from pure noise
    # the model calls after the first sit on the grid lambda_min + k h, k = 1 .. steps - 1: the first
    # step is stretched over the clipped part, no call is spent between sigma 1 and lambda_min
    h = (FLOW.lambda_max - S.FLOW_LAMBDA_MIN) / steps
    grid = lam(FLOW, s[1:-1])
    assert np.allclose(grid, S.FLOW_LAMBDA_MIN + h * np.arange(1, steps), rtol=1e-4, atol=1e-5)
    assert s[-1].item() == 0.0  # the grid's last point, lambda(sigma_min), is replaced by 0
    # lambda of the flow form: log((1 - s) / s)
    assert np.allclose(grid, np.log((1 - s[1:-1].numpy()) / s[1:-1].numpy()))


def test_logsnr_uniform_flow_options():
    s = S.get_sigmas_logsnr_uniform(6, FLOW, lambda_min=-1.0).double()
    assert lam(FLOW, s[1:2])[0] == pytest.approx(-1.0 + (FLOW.lambda_max + 1.0) / 6, abs=1e-5)
    # a flow model with sigma_max < 1 above the clip needs no clip: uniform from sigma_max
    p = Parameterization("flow", 0.002, 0.9, "flow")
    s = S.get_sigmas_logsnr_uniform(5, p).double()
    h = (p.lambda_max - p.lambda_min) / 5
    assert np.allclose(np.diff(lam(p, s[:-1])), h, rtol=1e-4)
    assert S.get_sigmas_logsnr_uniform(1, FLOW).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="lambda_min"):
        S.get_sigmas_logsnr_uniform(4, FLOW, lambda_min=10.0)
    with pytest.raises(ValueError, match="lambda_min"):
        S.get_sigmas_logsnr_uniform(4, FLOW, lambda_min=float("nan"))


# -- range schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_karras_matches_eq5(rho, steps):
    smin, smax = EPS.sigma_min, EPS.sigma_max
    n = steps
    expected = [
        (smax ** (1 / rho) + (i / (n - 1) if n > 1 else 0.0) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        for i in range(n)
    ] + [0.0]
    s = S.get_sigmas_karras(steps, EPS, rho=rho)
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)


def test_tables_on_a_zero_terminal_snr_model_say_they_start_lower(caplog):
    # a zSNR model's sigma_max is about 4500; the SD tables start at 14.6: allowed, with a warning
    zsnr = for_family("v", timestep_sigmas=discrete_vp_sigmas(zero_terminal_snr=True))
    assert zsnr.sigma_max > 1000
    with caplog.at_level("WARNING", logger="comfyui_fewstep.samplers.schedules"):
        s = S.get_sigmas("ays", 10, zsnr)
        assert s[0].item() == pytest.approx(14.615, rel=1e-3)
        S.get_sigmas("gits", 10, zsnr)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["ays", "gits"]
    assert "far below this model's sigma_max" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="comfyui_fewstep.samplers.schedules"):
        S.get_sigmas("ays", 10, EPS)
    assert not caplog.records


@pytest.mark.parametrize("rho", [0.1, 0.001])
def test_karras_small_rho_keeps_its_end_points(rho):
    # the direct form cancels (rho 0.1: sigma_max^10 + 1 * (sigma_min^10 - sigma_max^10) is 0, not
    # sigma_min^10) or overflows (rho 0.001); eq. 5 itself is a valid, if odd, schedule there
    smin, smax = EPS.sigma_min, EPS.sigma_max
    s = S.get_sigmas_karras(8, EPS, rho=rho).double()
    assert s[0].item() == pytest.approx(smax, rel=1e-6) and s[-2].item() == pytest.approx(smin, rel=1e-6)
    assert bool((s[1:] < s[:-1]).all()) and s[-1].item() == 0.0
    # an interior point: with sigma_min^(1/rho) negligible, eq. 5 is (1 - r)^rho sigma_max
    assert s[3].item() == pytest.approx((1 - 3 / 7) ** rho * smax, rel=1e-6)


def test_range_schedules_take_overrides_without_a_parameterization():
    s = S.get_sigmas_karras(4, None, sigma_min=0.1, sigma_max=10.0)
    assert s[0].item() == pytest.approx(10.0) and s[-2].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Parameterization"):
        S.get_sigmas_karras(4, None)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        S.get_sigmas_exponential(4, EPS, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="rho"):
        S.get_sigmas_karras(4, EPS, rho=0.0)


@pytest.mark.parametrize("steps", [2, 7, 30])
def test_exponential_is_log_linear(steps):
    s = S.get_sigmas_exponential(steps, EDM).double()
    logs = np.log(s[:-1].numpy())
    assert np.allclose(np.diff(logs), (math.log(EDM.sigma_min) - math.log(EDM.sigma_max)) / (steps - 1), rtol=1e-5)
    assert s[-2].item() == pytest.approx(EDM.sigma_min, rel=1e-6)


def test_polyexponential_closed_form():
    assert torch.equal(S.get_sigmas_polyexponential(9, EPS, rho=1.0), S.get_sigmas_exponential(9, EPS))
    n, rho = 6, 2.0
    lo, hi = math.log(EPS.sigma_min), math.log(EPS.sigma_max)
    expected = [math.exp(lo + (1 - i / (n - 1)) ** rho * (hi - lo)) for i in range(n)] + [0.0]
    assert torch.allclose(S.get_sigmas_polyexponential(n, EPS, rho=rho), torch.tensor(expected, dtype=torch.float32))


# -- time_uniform / time_quadratic -------------------------------------------------------------


def sd15_sigma_at(timestep: float) -> float:
    """Independent reference: the SD 1.5 table interpolated linearly in log sigma."""
    return float(np.exp(np.interp(timestep, np.arange(1000), np.log(SD15.numpy()))))


@pytest.mark.parametrize("steps", [3, 9, 37])
def test_time_uniform_sd15_hits_integer_timesteps(steps):
    # 999 is divisible by these step counts: timesteps 999, 999 - 999/steps, ..., 999/steps
    s = S.get_sigmas_time_uniform(steps, EPS)
    timesteps = [999 - i * (999 // steps) for i in range(steps)]
    expected = torch.tensor([SD15[t].item() for t in timesteps] + [0.0], dtype=torch.float32)
    assert torch.allclose(s, expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("steps", [4, 10])
def test_time_uniform_sd15_fractional_timesteps(steps):
    s = S.get_sigmas_time_uniform(steps, EPS)
    expected = [sd15_sigma_at(t) for t in np.linspace(999, 0, steps + 1)[:-1]] + [0.0]
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float32), rtol=1e-5)


def test_time_quadratic_sd15_is_uniform_in_sqrt_t():
    steps = 5
    t = np.linspace(1.0, math.sqrt(1 / 1000), steps + 1) ** 2  # DPM-Solver's t in [1/T, 1]
    expected = [sd15_sigma_at(x * 1000 - 1) for x in t[:-1]] + [0.0]
    s = S.get_sigmas_time_quadratic(steps, EPS)
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float32), rtol=1e-5)


def test_time_uniform_flow_uses_the_unshifted_time():
    shift, steps = 3.0, 3
    t = np.linspace(1.0, 1 / 1000, steps + 1)[:-1]  # 1, 0.667, 0.334: on the table grid
    expected = [shift * x / (1 + (shift - 1) * x) for x in t] + [0.0]
    s = S.get_sigmas_time_uniform(steps, FLOW3)
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float32), rtol=1e-6)
    # without a table the time is sigma itself
    bare = Parameterization("flow", 0.01, 1.0, "flow")
    assert torch.allclose(S.get_sigmas_time_uniform(3, bare), torch.tensor([1.0, 0.67, 0.34, 0.0]))


def test_time_uniform_edm_uses_vp_equivalent_time():
    steps, b0, bd = 4, 0.1, 19.9

    def t_of(s):
        return (math.sqrt(b0**2 + 2 * bd * math.log1p(s * s)) - b0) / bd

    s = S.get_sigmas_time_uniform(steps, EDM).double()
    ts = [t_of(float(x)) for x in s[:-1]]
    assert np.allclose(np.diff(ts), (t_of(EDM.sigma_min) - t_of(EDM.sigma_max)) / steps, rtol=1e-4)


def test_time_schedules_refuse_a_range_outside_the_table():
    with pytest.raises(ValueError, match="timestep table"):
        S.get_sigmas_time_uniform(4, EPS, sigma_max=20.0)


# -- table schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("model,table", [("sd15", AYS_SD15), ("sdxl", AYS_SDXL)])
def test_ays_10_steps_is_the_published_table(model, table):
    s = S.get_sigmas_ays(10, EPS, model=model)
    assert torch.equal(s, torch.tensor(table[:-1] + [0.0], dtype=torch.float32))


def test_ays_svd_and_auto():
    svd_table = torch.tensor(AYS_SVD[:-1] + [0.0], dtype=torch.float32)
    svd = Parameterization("ve", 0.002, 700.0, "edm")
    assert torch.equal(S.get_sigmas_ays(10, svd), svd_table)
    assert torch.equal(S.get_sigmas_ays(10, for_family("v")), torch.tensor(AYS_SD15[:-1] + [0.0], dtype=torch.float32))
    # SVD itself: continuous-time v-prediction (no timestep table), not a discrete v model like SD2
    svd_v = Parameterization("ve", 0.002, 700.0, "v")
    assert torch.equal(S.get_sigmas_ays(10, svd_v), svd_table)
    assert torch.equal(S.get_sigmas_ays(10, svd_v, model="svd"), svd_table)
    match = "sd15 table is for discrete-time .* but this model is a continuous-time 'v'"
    with pytest.raises(ValueError, match=match):
        S.get_sigmas_ays(10, svd_v, model="sd15")
    with pytest.raises(ValueError, match="GITS SD 1.5 table is for discrete-time"):
        S.get_sigmas_gits(10, svd_v)


@pytest.mark.parametrize("steps", [1, 4, 7, 20, 33])
def test_ays_interpolation_is_log_linear(steps):
    s = S.get_sigmas_ays(steps, EPS, model="sd15").double()
    xs = np.linspace(0, 1, 11)
    ys = np.log(AYS_SD15)
    expected = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))
    assert np.allclose(s[:-1].numpy(), expected[:-1], rtol=1e-6)
    assert s[0].item() == pytest.approx(AYS_SD15[0])
    assert bool((s[:-1] > s[1:]).all())
    if steps == 20:  # every other point of the 20-step schedule is a published point
        assert np.allclose(s[0:-1:2].numpy(), AYS_SD15[:-1], rtol=1e-6)


def test_table_schedules_refuse_the_wrong_family():
    for p in (FLOW, FLOW3):
        with pytest.raises(ValueError, match="AYS|Align Your Steps"):
            S.get_sigmas("ays", 10, p)
        with pytest.raises(ValueError, match="GITS"):
            S.get_sigmas("gits", 10, p)
    with pytest.raises(ValueError, match="AYS sd15 table is for discrete-time eps/v/x0"):
        S.get_sigmas_ays(10, EDM, model="sd15")
    with pytest.raises(ValueError, match="AYS svd table is for continuous-time"):
        S.get_sigmas_ays(10, EPS, model="svd")
    with pytest.raises(ValueError, match="outside this model's range"):
        S.get_sigmas_ays(10, EDM)  # EDM's 0.002..80 cannot hold the SVD table (700)
    zsnr_narrow = for_family("eps", sigma_min=0.05)
    with pytest.raises(ValueError, match="outside this model's range"):
        S.get_sigmas_gits(10, zsnr_narrow)
    with pytest.raises(ValueError, match="model must be one of"):
        S.get_sigmas_ays(10, EPS, model="sd3")


def test_gits_tables():
    s = S.get_sigmas_gits(4, EPS, coeff=1.2)
    # GITS SD 1.5, coeff 1.20, 4 steps (zju-pi/diff-sampler gits-main)
    assert torch.equal(s, torch.tensor([14.61464119, 2.36326075, 0.92192322, 0.36617002, 0.0], dtype=torch.float32))
    for coeff in S.GITS_COEFFS:
        for steps in (1, 2, 10, 20, 21, 40):
            out = S.get_sigmas_gits(steps, EPS, coeff=coeff)
            assert out.numel() == steps + 1 and bool((out[:-1] > out[1:]).all())
    long = S.get_sigmas_gits(40, EPS).double()
    table20 = S.get_sigmas_gits(20, EPS).double()
    assert long[0].item() == pytest.approx(table20[0].item())
    with pytest.raises(ValueError, match="coeff must be one of"):
        S.get_sigmas_gits(10, EPS, coeff=1.23)


# -- denoise and the dispatcher ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["karras", "logsnr_uniform", "ays", "time_uniform"])
def test_denoise_keeps_the_tail_of_a_longer_schedule(name):
    full = S.get_sigmas(name, 20, EPS)
    part = S.get_sigmas(name, 10, EPS, denoise=0.5)
    assert torch.equal(part, full[-11:])
    # ComfyUI's BasicScheduler: int(steps / denoise) total steps (3 / 0.3 -> 10)
    assert torch.equal(S.get_sigmas(name, 3, EPS, denoise=0.3), S.get_sigmas(name, 10, EPS)[-4:])
    assert torch.equal(S.get_sigmas(name, 7, EPS, denoise=1.0), S.get_sigmas(name, 7, EPS))


def test_denoise_edges():
    empty = S.get_sigmas("karras", 10, EPS, denoise=0.0)
    assert empty.numel() == 0 and empty.dtype == torch.float32
    assert S.get_sigmas("karras", 10, EPS, denoise=-1.0).numel() == 0
    with pytest.raises(ValueError, match="denoise"):
        S.get_sigmas("karras", 10, EPS, denoise=1.5)


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="unknown schedule 'normal'"):
        S.get_sigmas("normal", 10, EPS)
    with pytest.raises(TypeError, match="unknown option"):
        S.get_sigmas("logsnr_uniform", 10, EPS, rho=7.0)
    assert torch.equal(S.get_sigmas("karras", 5, EPS, rho=3.0), S.get_sigmas_karras(5, EPS, rho=3.0))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="steps must be >= 1"):
            S.get_sigmas("karras", bad, EPS)
    for bad in (2.0, True, "4"):
        with pytest.raises(TypeError, match="steps must be an int"):
            S.get_sigmas("karras", bad, EPS)
    with pytest.raises(ValueError, match="needs an integer steps"):
        S.get_sigmas("karras", None, EPS)
    with pytest.raises(TypeError, match="Parameterization"):
        S.get_sigmas("logsnr_uniform", 4, None)


# -- custom ------------------------------------------------------------------------------------


def test_custom_parsing():
    assert S.parse_sigmas("14.6, 7.0, 3.1, 0") == [14.6, 7.0, 3.1, 0.0]
    assert S.parse_sigmas("[14.6 7.0; 3.1]") == [14.6, 7.0, 3.1, 0.0]  # trailing 0 appended
    assert S.parse_sigmas([2, 1]) == [2.0, 1.0, 0.0]
    s = S.get_sigmas("custom", None, EPS, sigmas="14.6, 7.0, 3.1, 0")
    assert torch.equal(s, torch.tensor([14.6, 7.0, 3.1, 0.0], dtype=torch.float32))
    assert torch.equal(S.get_sigmas("custom", 3, None, sigmas="14.6, 7.0, 3.1"), s)


@pytest.mark.parametrize(
    "text,match",
    [
        ("14.6, seven, 0", "'seven' is not a number"),
        ("", "empty"),
        ("1, 2, 0", "strictly decreasing"),
        ("3, 3, 0", "strictly decreasing"),
        ("3, 0, 1", "strictly decreasing"),
        ("3, -1", ">= 0"),
        ("3, nan, 0", "finite"),
        ("0", "at least one sigma"),
    ],
)
def test_custom_parsing_errors(text, match):
    with pytest.raises(ValueError, match=match):
        S.get_sigmas("custom", None, EPS, sigmas=text)


def test_custom_resampling_and_bounds():
    s = S.get_sigmas("custom", 6, EPS, sigmas="8, 1, 0.125").double()
    assert s.numel() == 7 and s[-1].item() == 0.0
    assert np.allclose(np.log2(s[:-1].numpy()), np.linspace(3, -3, 6), atol=1e-6)
    with pytest.raises(ValueError, match="flow sigmas must be <= 1"):
        S.get_sigmas("custom", None, FLOW, sigmas="1.5, 0.5, 0")
    # a rounding error above 1 is accepted as 1, which the samplers then take (they refuse > 1)
    flow = S.get_sigmas("custom", None, FLOW, sigmas="1.0000001, 0.5, 0")
    assert flow.tolist() == [1.0, 0.5, 0.0]
    assert sigma_list(flow, FLOW)[0] == 1.0
    part = S.get_sigmas("custom", 2, EPS, denoise=0.5, sigmas="8, 4, 2, 1")
    assert torch.equal(part, torch.tensor([2.0, 1.0, 0.0]))


@pytest.mark.parametrize("denoise,tail", [(0.5, [1.2, 0.3, 0.0]), (0.75, [4.0, 1.2, 0.3, 0.0]),
                                          (0.1, [0.3, 0.0]), (1.0, [14.61, 4.0, 1.2, 0.3, 0.0])])
def test_custom_list_with_denoise_keeps_its_tail(denoise, tail):
    # the list's own step count (steps None, as the node passes it): img2img keeps the last steps of
    # the list with the values as typed, never a log-linear resampling of it
    s = S.get_sigmas("custom", None, EPS, denoise=denoise, sigmas="14.61, 4.0, 1.2, 0.3, 0")
    assert torch.equal(s, torch.tensor(tail, dtype=torch.float32))
