"""Recipe numbers against the students' own code (see the ``source`` of each recipe)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from comfyui_fewstep.distill_loaders import recipes as R
from comfyui_fewstep.distill_loaders.recipes import ddpm_sigma, recipe_sigmas
from comfyui_fewstep.distill_loaders.specs import RECIPES, Recipe, get_recipe


def _abar_numpy(t: int) -> float:
    """diffusers' scaled_linear betas, computed independently with numpy."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1.0 - betas)[t])


@pytest.mark.parametrize("t", [999, 899, 800, 749, 625, 499, 399, 249, 0])
def test_ddpm_sigma_matches_independent_schedule(t):
    abar = _abar_numpy(t)
    assert R.alphas_cumprod(t) == pytest.approx(abar, rel=1e-12)
    assert R.ddpm_sigma(t) == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-12)


def test_students_published_constants():
    # SiD-LSG t_init 625: sigma 2.5017 (= SiD's sigma_init 2.5 in EDM units).
    assert R.ddpm_sigma(625) == pytest.approx(2.5017, abs=5e-5)
    # DMD2 SD1.5 / SwiftBrush hard-code abar_999 = 0.0047.
    assert R.alphas_cumprod(999) == pytest.approx(0.0047, abs=5e-5)
    # DMD2-SDXL 1-step at t=399: sigma 1.1606, ComfyUI's default input std there 0.7576.
    s399 = R.ddpm_sigma(399)
    assert s399 == pytest.approx(1.1606, abs=5e-5)
    assert s399 / math.sqrt(1 + s399**2) == pytest.approx(0.7576, abs=5e-5)


def test_dmd2_sdxl_one_step_feeds_unit_variance_at_399():
    r = get_recipe("dmd2_sdxl_1step")
    sigmas = R.recipe_sigmas(r)
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0 and len(sigmas) == 2
    assert R.timestep_from_sigma(float(sigmas[0])) == 399
    s = R.first_step_noise_scale(r, float(sigmas[0]))
    # the eps UNet sees x / sqrt(1 + sigma^2): with x = s z that must be exactly z.
    assert s / math.sqrt(1 + float(sigmas[0]) ** 2) == pytest.approx(1.0, abs=1e-15)
    assert R.network_input_std(r, float(sigmas[0])) == 1.0
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unet_input = (s * z) / math.sqrt(1 + float(sigmas[0]) ** 2)
    assert unet_input.std().item() == pytest.approx(1.0, abs=0.01)


def test_sid_lsg_feeds_ddpm_add_noise_at_625():
    r = get_recipe("sid_lsg_sd15_1step")
    sigma0 = float(R.recipe_sigmas(r)[0])
    assert sigma0 == pytest.approx(2.5017, abs=5e-5)
    s = R.first_step_noise_scale(r, sigma0)
    # DDPMScheduler.add_noise(0, z, 625) = sqrt(1 - abar_625) z
    assert s / math.sqrt(1 + sigma0**2) == pytest.approx(math.sqrt(1 - _abar_numpy(625)), rel=1e-12)
    assert R.network_input_std(r, sigma0) == pytest.approx(0.9286, abs=5e-5)


def test_hyper_one_step_unet_at_800_unit_noise():
    r = get_recipe("hyper_sdxl_1step_unet")
    sigma0 = float(R.recipe_sigmas(r)[0])
    assert R.timestep_from_sigma(sigma0) == 800
    assert sigma0 == pytest.approx(5.1110, abs=5e-4)
    assert R.first_step_noise_scale(r, sigma0) == pytest.approx(math.sqrt(1 + sigma0**2))


@pytest.mark.parametrize(
    "name, steps, expected",
    [
        ("dmd2_sdxl_4step", 4, [999, 749, 499, 249]),
        ("dmd2_sd15_1step", 1, [999]),
        ("sdxl_lightning_2step", 2, [999, 499]),
        ("sdxl_lightning_4step", 4, [999, 749, 499, 249]),
        ("sdxl_lightning_8step", 8, [999, 874, 749, 624, 499, 374, 249, 124]),
        ("hyper_12step_cfg_lora", 12, [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82]),
        ("lcm_lora", 4, [999, 759, 499, 259]),
        ("lcm_lora", 2, [999, 499]),
        ("lcm", 8, [999, 879, 759, 639, 499, 379, 259, 139]),
        ("tcd_lora", 4, [999, 759, 499, 259]),
        # PCM: diffusers' TCDScheduler(timestep_spacing="trailing") as in the authors' demo/app.py;
        # set_timesteps ignores timestep_spacing and takes floor(linspace(0, 50, N)) on the 50-step
        # grid 999, 979, ..., 19 (huggingface/diffusers: src/diffusers/schedulers/scheduling_tcd.py).
        ("pcm_smallcfg_2step", 2, [999, 499]),
        ("pcm_smallcfg_4step", 4, [999, 759, 499, 259]),
        ("pcm_normalcfg_8step", 8, [999, 879, 759, 639, 499, 379, 259, 139]),
        (
            "pcm_smallcfg_16step",
            16,
            [999, 939, 879, 819, 759, 699, 639, 579, 499, 439, 379, 319, 259, 199, 139, 79],
        ),
        ("sd_turbo_sd21", 4, [999, 899, 799, 699]),
        ("sdxl_turbo_sdxl", 1, [999]),
        ("swiftbrush_sd21_1step", 1, [999]),
        ("instaflow_sd15_1step", 1, [1000.0]),
        ("rectified_flow_2_sd15", 4, [1000.0, 750.0, 500.0, 250.0]),
        ("sid_lsg_sd15_1step", 1, [625]),
        ("sid_lsg_sd15_1step", 5, [625, 500, 375, 250, 125]),
        # upstream truncates a float32 product: (625 * (1 - i/K)).to(torch.long)
        ("sid_lsg_sd15_1step", 3, [625, 416, 208]),
    ],
)
def test_timesteps(name, steps, expected):
    assert R.recipe_timesteps(name, steps) == [float(t) for t in expected]


def test_trailing_matches_diffusers_formula():
    # every n whose arange has n values (numpy's length rounding adds one for a few n, e.g. 61)
    for n in range(1, 201):
        diffusers = (np.round(np.arange(1000, 0, -1000 / n)) - 1).astype(int).tolist()
        if len(diffusers) != n:
            continue
        recipe = Recipe("t", "t", ("sdxl",), "eps", "trailing", "euler", "unit", n)
        assert R.recipe_timesteps(recipe, n) == [float(t) for t in diffusers]


def test_lcm_grid_matches_diffusers_formula():
    origin = np.arange(1, 51) * 20 - 1
    for n in (1, 2, 3, 4, 5, 8):
        idx = np.floor(np.linspace(0, 50, num=n, endpoint=False)).astype(np.int64)
        expected = origin[::-1][idx].tolist()
        assert R.recipe_timesteps("lcm", n) == [float(t) for t in expected]
    # the whole grid at 50 steps; beyond it the grid would repeat timesteps (diffusers refuses too)
    assert R.recipe_timesteps("lcm", 50) == [float(t) for t in origin[::-1]]
    for recipe in ("lcm", "lcm_lora", "tcd_lora", "hyper_1step_lora_tcd"):
        with pytest.raises(ValueError, match="LCM's 50-step grid: at most 50 steps, got 51"):
            R.recipe_sigmas(recipe, 51)


def test_flow_sigmas_are_one_minus_i_over_n():
    sig = R.recipe_sigmas("rectified_flow_2_sd15", 4)
    assert sig.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert R.first_step_noise_scale("instaflow_sd15_1step", 1.0) == 1.0


def test_edm_sigmas():
    assert R.recipe_sigmas("sid_edm_1step").tolist() == [2.5, 0.0]
    assert R.recipe_sigmas("dmd2_imagenet_1step").tolist() == [80.0, 0.0]
    assert R.first_step_noise_scale("sid_edm_1step", 2.5) == 2.5


def test_renoise_is_ddpm_add_noise_in_ve_coordinates():
    g = torch.Generator().manual_seed(1)
    x0, z = (
        torch.randn(4, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 8, generator=g, dtype=torch.float64),
    )
    t = 499
    abar = _abar_numpy(t)
    ddpm = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * z  # DDPMScheduler.add_noise
    ve = R.renoise(x0, R.ddpm_sigma(t), z)
    torch.testing.assert_close(ve * math.sqrt(abar), ddpm, rtol=1e-12, atol=1e-12)
    assert torch.equal(R.renoise(x0, 0.0, z), x0)


def test_lcm_boundary_scalings():
    c_skip, c_out = R.lcm_boundary_scalings(999)
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25))
    assert c_out == pytest.approx(9990 / math.sqrt(9990**2 + 0.25))
    assert R.lcm_boundary_scalings(0) == (1.0, 0.0)


def test_step_count_errors_name_the_recipe():
    with pytest.raises(ValueError, match="sdxl_lightning_4step.*\\[4\\]"):
        R.recipe_timesteps("sdxl_lightning_4step", 2)
    with pytest.raises(ValueError, match="distilled for \\[1, 2, 3, 4\\] steps, got 5"):
        R.recipe_timesteps("sd_turbo_sd21", 5)
    with pytest.raises(ValueError, match="positive integer"):
        R.recipe_timesteps("lcm", 0)
    with pytest.raises(ValueError, match="unknown student recipe 'nope'.*dmd2_sdxl_1step"):
        get_recipe("nope")


def test_every_recipe_produces_decreasing_sigmas_ending_in_zero():
    for name, recipe in RECIPES.items():
        sig = R.recipe_sigmas(recipe)
        assert len(sig) == recipe.steps + 1, name
        assert sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all()), name
        assert recipe.source, name


def test_recipe_validation():
    with pytest.raises(ValueError, match="prediction 'v_pred'"):
        Recipe("x", "x", ("sd15",), "v_pred", "trailing", "euler", "unit", 1)
    with pytest.raises(ValueError, match="needs timesteps"):
        Recipe("x", "x", ("sd15",), "eps", "fixed", "euler", "unit", 1)


def test_custom_timesteps_parse_validate_and_give_the_ddpm_sigmas():
    """A step-distilled student's own timesteps: sigma_t = sqrt((1 - abar_t) / abar_t) of SD's
    scaled-linear schedule, written out here from the betas."""
    from comfyui_fewstep.distill_loaders.specs import get_recipe, parse_timesteps, with_timesteps

    assert parse_timesteps("999, 759,499 259") == (999, 759, 499, 259)
    for bad, match in (("", "empty"), ("999, 1000", r"\[0, 999\]"), ("500, 700", "strictly decreasing"),
                       ("999, x", "integers")):
        with pytest.raises(ValueError, match=match):
            parse_timesteps(bad)
    recipe = with_timesteps(get_recipe("step_distilled_v"), (999, 874, 749, 624, 499, 374, 249, 124))
    assert recipe.prediction == "v" and recipe.steps == 8
    # diffusers' DDIM pipeline starts from randn * init_noise_sigma (1): unit variance at any first t
    for t0 in (999, 799):
        r = with_timesteps(get_recipe("step_distilled_eps"), (t0, 499))
        assert R.network_input_std(r, float(recipe_sigmas(r)[0])) == 1.0
    betas = [(0.00085**0.5 + i * (0.012**0.5 - 0.00085**0.5) / 999) ** 2 for i in range(1000)]
    abar, table = 1.0, []
    for b in betas:
        abar *= 1.0 - b
        table.append(math.sqrt((1.0 - abar) / abar))
    sigmas = recipe_sigmas(recipe).tolist()
    assert sigmas[-1] == 0.0 and sigmas[:-1] == pytest.approx([table[int(t)] for t in recipe.timesteps], rel=1e-12)
    with pytest.raises(ValueError, match="no DDPM timesteps"):
        with_timesteps(get_recipe("instaflow_sd15_1step"), (999,))
    # LCM: ComfyUI's LCM sampling knows only the 50-step grid; off-grid steps would be moved silently
    on_grid = with_timesteps(get_recipe("lcm_lora"), (999, 759, 499, 259))
    assert on_grid.timesteps == (999.0, 759.0, 499.0, 259.0)
    with pytest.raises(ValueError, match=r"\[749, 249\] are not on it. Use 739, 239 instead"):
        with_timesteps(get_recipe("lcm_lora"), (999, 749, 499, 249))
    assert with_timesteps(get_recipe("tcd_lora"), (999, 749)).timesteps == (999.0, 749.0)  # eps: any timestep
    # SwiftBrush's own abar (0.0047) is that of t = 999: kept from 999, dropped from another start
    assert with_timesteps(get_recipe("swiftbrush_sd21_1step"), (999, 499)).x0_abar == 0.0047
    assert with_timesteps(get_recipe("swiftbrush_sd21_1step"), (899,)).x0_abar is None


def test_tcd_eta_and_registered_recipes():
    from dataclasses import replace

    from comfyui_fewstep.distill_loaders import specs

    assert specs.with_tcd_eta(specs.get_recipe("tcd_lora"), 0.1).eta == 0.1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        specs.with_tcd_eta(specs.get_recipe("tcd_lora"), 1.5)
    with pytest.raises(ValueError, match="eta applies to TCD recipes"):
        specs.with_tcd_eta(specs.get_recipe("dmd2_sd15_1step"), 0.3)
    mine = replace(specs.get_recipe("step_distilled_eps"), name="my_student_sd15", timesteps=(999, 499), schedule="fixed",
                   steps=2)
    try:
        specs.register_recipe(mine)
        assert specs.get_recipe("my_student_sd15") is mine and "my_student_sd15" in specs.recipe_names()
        with pytest.raises(ValueError, match="exists already"):
            specs.register_recipe(mine)
        assert recipe_sigmas("my_student_sd15").tolist()[:-1] == pytest.approx([ddpm_sigma(999), ddpm_sigma(499)])
    finally:
        specs.RECIPES.pop("my_student_sd15", None)


def test_hyper_cfg_preserved_loras_keep_guidance():
    # the card: CFG-preserved LoRAs "support 5~8 guidance scales"; the plain N-step LoRAs run cfg off
    for n in (8, 12):
        r = get_recipe(f"hyper_{n}step_cfg_lora")
        assert 5.0 <= r.cfg <= 8.0 and r.steps == n and r.schedule == "trailing" and r.is_lora
    assert get_recipe("hyper_8step_lora").cfg == 1.0


def test_sid_lsg_multi_step_timesteps_match_torch_truncation():
    # sid_sd_sampler: init_timesteps_i = (init_timesteps * (1 - i / K)).to(torch.long)
    t_init = torch.tensor([625])
    for k in range(1, 41):
        upstream = [int((t_init * (1 - i / k)).to(torch.long)) for i in range(k)]
        assert R.recipe_timesteps("sid_lsg_sd15_1step", k) == [float(t) for t in upstream], k
