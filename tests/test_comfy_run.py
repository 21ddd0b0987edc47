"""In-process ComfyUI runs of our SAMPLER / SIGMAS on a tiny real ComfyUI model.

The model is ComfyUI's own SD1.5-type ``BaseModel`` (shrunken UNet, random weights), sampled
through the same guider / ``KSAMPLER`` / ``KSamplerX0Inpaint`` code as in the app.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

LATENT = (1, 4, 8, 8)



@pytest.fixture(scope="module")
def api(comfy):
    import comfy.sample
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom
    from comfyui_fewstep.nodes import ksampler_presets, sampler_nodes, schedule_nodes

    return {
        "comfy_sample": comfy.sample,
        "samplers": comfy.samplers,
        "custom": custom,
        "presets": ksampler_presets,
        "sampler_nodes": sampler_nodes,
        "schedule_nodes": schedule_nodes,
    }


def _sampler(api, **overrides):
    widgets = {
        "solver": "multistep",
        "order": 2,
        "solver_type": "midpoint",
        "prediction": "dpmsolver++",
        "lower_order_final": True,
        "lower_order_final_steps": 10,
        "euler_at_final": False,
        "final_step": "zero",
        "eta": 0.0,
        "s_noise": 1.0,
        "corrector": "none",
        "thresholding": "none",
        "threshold_percentile": 0.995,
        "threshold_max": 1.0,
    }
    widgets.update(overrides)
    return api["sampler_nodes"].FewStepDPMSolverSampler.execute(**widgets).result[0]


def _sigmas(api, model, schedule="logsnr_uniform", steps=4, denoise=1.0):
    return api["schedule_nodes"].FewStepSchedule.execute(model, schedule, steps, denoise).result[0]


def _guider(api, model, conds, cfg):
    guider = api["samplers"].CFGGuider(model)
    guider.set_conds(*conds)
    guider.set_cfg(cfg)
    return guider


def _noise(seed=0):
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))



def test_guider_sample_runs_with_callbacks(api, tiny_comfy_model, tiny_comfy_conds):
    steps = []
    sigmas = _sigmas(api, tiny_comfy_model, steps=4)
    assert sigmas.shape == (5,) and sigmas[-1] == 0
    with torch.inference_mode():
        out = _guider(api, tiny_comfy_model, tiny_comfy_conds, 3.0).sample(
            _noise(),
            torch.zeros(LATENT),
            _sampler(api),
            sigmas,
            callback=lambda i, x0, x, total: steps.append((i, total)),
            disable_pbar=True,
            seed=0,
        )
    assert out.shape == LATENT and torch.isfinite(out).all()
    assert steps == [(i, 4) for i in range(4)]


def test_custom_schedule_is_used_as_given(api, tiny_comfy_model):
    """The steps widget (default 8) does not resample a typed list: its length sets the steps."""
    node = api["schedule_nodes"].FewStepSchedule
    for steps in (8, 0, 4):
        out = node.execute(tiny_comfy_model, "custom", steps, 1.0, custom_sigmas="14.6, 4.0, 1.2, 0.3")
        sigmas = out.result[0]
        torch.testing.assert_close(sigmas, torch.tensor([14.6, 4.0, 1.2, 0.3, 0.0]))


def test_adaptive_progress_follows_the_solution(api, tiny_comfy_model, tiny_comfy_conds):
    """ComfyUI sizes the bar from the sigmas; the adaptive solver fills it only as it ends."""
    steps = []
    sigmas = _sigmas(api, tiny_comfy_model, "karras", 10)
    with torch.inference_mode():
        out = _guider(api, tiny_comfy_model, tiny_comfy_conds, 3.0).sample(
            _noise(),
            torch.zeros(LATENT),
            _sampler(api, solver="adaptive", order=3, atol=1e-3, rtol=1e-3),
            sigmas,
            callback=lambda i, x0, x, total: steps.append((i, total)),
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(out).all()
    positions = [i for i, total in steps]
    assert {total for i, total in steps} == {10} and len(steps) > 3
    assert positions[0] < 5 and positions == sorted(positions) and positions[-1] == 9


def test_sampler_custom_advanced_node(api, tiny_comfy_model, tiny_comfy_conds):
    custom = api["custom"]
    guider = _guider(api, tiny_comfy_model, tiny_comfy_conds, 2.0)
    with torch.inference_mode():
        out = custom.SamplerCustomAdvanced().sample(
            custom.Noise_RandomNoise(7),
            guider,
            _sampler(api, order=3, corrector="bh2"),
            _sigmas(api, tiny_comfy_model, "karras", 4),
            {"samples": torch.zeros(LATENT)},
        )
    samples, denoised = out[0]["samples"], out[1]["samples"]
    assert torch.isfinite(samples).all() and torch.isfinite(denoised).all()
    # the last step goes to sigma 0, so the output is the last data prediction (SamplerCustom's x0 output)
    torch.testing.assert_close(samples, denoised)


def test_denoise_mask_keeps_the_unmasked_latent(api, tiny_comfy_model, tiny_comfy_conds):
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0  # repaint the left half only
    with torch.inference_mode():
        out = _guider(api, tiny_comfy_model, tiny_comfy_conds, 2.0).sample(
            _noise(),
            latent,
            _sampler(api, order=3),
            _sigmas(api, tiny_comfy_model, steps=4, denoise=0.8),
            denoise_mask=mask,
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 4:], latent[..., 4:], rtol=1e-5, atol=1e-5)
    assert (out[..., :4] - latent[..., :4]).abs().max() > 1e-2


def test_ksampler_dropdown_path_equals_the_node_path(api, tiny_comfy_model, tiny_comfy_conds):
    """KSampler with fewstep_dpmpp_3m / fewstep_logsnr runs our code: same result as the nodes."""
    api["presets"].register_ksampler_presets()
    positive, negative = tiny_comfy_conds
    with torch.inference_mode():
        ksampler = api["comfy_sample"].sample(
            tiny_comfy_model,
            _noise(),
            4,
            2.0,
            "fewstep_dpmpp_3m",
            "fewstep_logsnr",
            positive,
            negative,
            torch.zeros(LATENT),
            disable_pbar=True,
            seed=0,
        )
        nodes = api["comfy_sample"].sample_custom(
            tiny_comfy_model,
            _noise(),
            2.0,
            _sampler(api, order=3),
            _sigmas(api, tiny_comfy_model, steps=4),
            positive,
            negative,
            torch.zeros(LATENT),
            disable_pbar=True,
            seed=0,
        )
        euler = api["comfy_sample"].sample(  # what KSampler silently falls back to for unknown names
            tiny_comfy_model,
            _noise(),
            4,
            2.0,
            "euler",
            "fewstep_logsnr",
            positive,
            negative,
            torch.zeros(LATENT),
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(ksampler).all()
    torch.testing.assert_close(ksampler, nodes, rtol=0, atol=0)
    assert (ksampler - euler).abs().max() > 1e-2


def test_nfe_plan_spends_the_budget(api, tiny_comfy_model, tiny_comfy_conds, unet_counter):
    counter = unet_counter
    model = tiny_comfy_model.clone()
    model.set_model_unet_function_wrapper(counter)
    out = api["schedule_nodes"].FewStepNFEPlan.execute(model, "dpmpp_3s", 7, "logsnr_uniform", 1.0)
    sampler, sigmas, text = out.result
    assert "7 model calls" in text and out.ui is not None
    # a preset whose method the solver and order do not name is shown by its own name
    node = api["schedule_nodes"].FewStepNFEPlan
    plan = node.execute(model, "unipc_bh2", 7, "logsnr_uniform", 1.0).result[2]
    assert plan == "unipc_bh2: 7 model calls: 7 steps of DPM-Solver++(3M) + UniC-bh2"
    plan = node.execute(model, "dpmpp_2m_sde", 7, "logsnr_uniform", 1.0).result[2]
    assert "7 steps of SDE-DPM-Solver++(2M), eta 1" in plan
    # the few-step preset brings its own window to logsnr_window (and only there)
    from comfyui_fewstep.samplers.schedules import FEWSTEP_WINDOW

    _, window, plan = node.execute(model, "dpmpp_2m_fast", 6, "logsnr_window", 1.0).result
    fewstep = api["schedule_nodes"].FewStepSchedule.execute(
        model, "logsnr_window", 6, 1.0, lambda_start=FEWSTEP_WINDOW["lambda_start"],
        sigma_end=FEWSTEP_WINDOW["sigma_end"]).result[0]
    default = api["schedule_nodes"].FewStepSchedule.execute(model, "logsnr_window", 6, 1.0).result[0]
    torch.testing.assert_close(window, fewstep, rtol=0, atol=0)
    assert not torch.equal(window, default)
    assert plan == ("dpmpp_2m_fast: 6 model calls: 6 steps of DPM-Solver++(2M) + UniC-bh2 + "
                    "gaussian first step + order-4 last step (gaussian weights)")
    # the preset without the call at sigma_max: one step more than calls, on its own window
    from comfyui_fewstep.samplers.schedules import SKIP_WINDOW

    skip_sampler, skip_sigmas, plan = node.execute(model, "dpmpp_2m_fast_skip", 5, "logsnr_window",
                                                   1.0).result
    own = api["schedule_nodes"].FewStepSchedule.execute(
        model, "logsnr_window", 6, 1.0, lambda_start=SKIP_WINDOW["lambda_start"],
        sigma_end=SKIP_WINDOW["sigma_end"]).result[0]
    torch.testing.assert_close(skip_sigmas, own, rtol=0, atol=0)
    assert plan.startswith("dpmpp_2m_fast_skip: 5 model calls: 6 steps of DPM-Solver++(2M) + UniC-bh2 + skip "
                           "start") and "no model call at sigma_max" in plan
    skip_steps = []
    before = counter.calls
    with torch.inference_mode():
        _guider(api, model, tiny_comfy_conds, 1.0).sample(
            _noise(), torch.zeros(LATENT), skip_sampler, skip_sigmas,
            callback=lambda i, *a: skip_steps.append(i), disable_pbar=True, seed=0)
    assert counter.calls - before == 5 and skip_steps == list(range(6))
    # where the sampler does not skip, the plan does not either: the budget is kept
    for args, note in (((5, "logsnr_window", 8.0), "cfg 8 is above 7: the gaussian first step"),
                       ((5, "logsnr_window", 1.0, 0.6), "denoise below 1"),
                       ((1, "logsnr_window", 1.0), "one call: no step to skip")):
        _, lower, plan = node.execute(model, "dpmpp_2m_fast_skip", *args).result
        assert len(lower) - 1 == args[0] and note in plan and f"{args[0]} model call" in plan, plan
    counter.calls = 0
    _, uniform, _ = node.execute(model, "dpmpp_2m_fast", 6, "logsnr_uniform", 1.0).result
    plain = api["schedule_nodes"].FewStepSchedule.execute(model, "logsnr_uniform", 6, 1.0).result[0]
    torch.testing.assert_close(uniform, plain, rtol=0, atol=0)
    _, empty, plan = node.execute(model, "dpmpp_2m", 6, "logsnr_uniform", 1.0, denoise=0.0).result
    assert empty.numel() == 0 and "denoise 0 leaves no step: 0 model calls" in plan
    steps = []
    with torch.inference_mode():
        x = _guider(api, model, tiny_comfy_conds, 1.0).sample(
            _noise(),
            torch.zeros(LATENT),
            sampler,
            sigmas,
            callback=lambda i, *a: steps.append(i),
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(x).all()
    assert counter.calls == 7  # cfg 1: one forward per model call
    assert steps == list(range(len(sigmas) - 1))


def test_nfe_plan_singlestep_runs_on_split_and_other_sigmas(api, tiny_comfy_model, tiny_comfy_conds,
                                                            unet_counter):
    """The plan's singlestep orders go with its own sigmas: split in two (SplitSigmas, the two-pass
    pattern) the parts spend the same calls and give the same result as the whole; other sigmas
    run with the default order allocation instead of failing on the plan's orders."""
    import comfy_extras.nodes_custom_sampler as custom

    model = tiny_comfy_model.clone()
    model.set_model_unet_function_wrapper(unet_counter)
    sampler, sigmas, _ = api["schedule_nodes"].FewStepNFEPlan.execute(model, "dpmpp_3s", 7, "logsnr_uniform",
                                                                      1.0).result
    guider = _guider(api, model, tiny_comfy_conds, 1.0)
    run = custom.SamplerCustomAdvanced().sample
    latent = {"samples": torch.zeros(LATENT)}
    high, low = custom.SplitSigmas().get_sigmas(sigmas, 1)
    with torch.inference_mode():
        whole = run(custom.Noise_RandomNoise(3), guider, sampler, sigmas, latent)[0]["samples"]
        calls = unet_counter.calls
        first = run(custom.Noise_RandomNoise(3), guider, sampler, high, latent)[0]
        second = run(custom.Noise_EmptyNoise(), guider, sampler, low, first)[0]["samples"]
        assert unet_counter.calls - calls == calls == 7
        torch.testing.assert_close(second, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
        other = _sigmas(api, model, "karras", 4)
        out = run(custom.Noise_RandomNoise(3), guider, sampler, other, latent)[0]["samples"]
    assert torch.isfinite(out).all()


def test_flow_model_via_object_patch(api, tiny_comfy_model, tiny_comfy_conds):
    """A CONST model_sampling object patch (what ModelSamplingSD3 does) switches us to flow form."""
    import comfy.model_sampling as cms
    from comfyui_fewstep.nodes._comfy_sampling import parameterization_for_model

    flow = type("FlowSampling", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})()
    flow.set_parameters(shift=3.0)
    model = tiny_comfy_model.clone()
    model.add_object_patch("model_sampling", flow)
    assert parameterization_for_model(model).kind == "flow"
    assert parameterization_for_model(tiny_comfy_model).kind == "ve"  # the input MODEL is untouched
    sigmas = _sigmas(api, model, "time_uniform", 4)
    assert float(sigmas[0]) <= 1.0
    with torch.inference_mode():
        out = _guider(api, model, tiny_comfy_conds, 2.0).sample(
            _noise(),
            torch.zeros(LATENT),
            _sampler(api, order=3),
            sigmas,
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("solver", ["singlestep", "adaptive"])
def test_other_solver_families_run(api, tiny_comfy_model, tiny_comfy_conds, solver):
    steps = []
    with torch.inference_mode():
        out = _guider(api, tiny_comfy_model, tiny_comfy_conds, 1.0).sample(
            _noise(),
            torch.zeros(LATENT),
            _sampler(api, solver=solver, order=2),
            _sigmas(api, tiny_comfy_model, steps=3),
            callback=lambda i, *a: steps.append(i),
            disable_pbar=True,
            seed=0,
        )
    assert torch.isfinite(out).all() and steps


def test_sde_noise_follows_the_seed(api, tiny_comfy_model, tiny_comfy_conds):
    sampler = _sampler(api, eta=1.0)
    sigmas = _sigmas(api, tiny_comfy_model, steps=3)

    def run(seed):
        with torch.inference_mode():
            return _guider(api, tiny_comfy_model, tiny_comfy_conds, 1.0).sample(
                _noise(), torch.zeros(LATENT), sampler, sigmas, disable_pbar=True, seed=seed
            )

    a, b, c = run(5), run(5), run(6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def _guiders(api, model, conds):
    import comfy_extras.nodes_perpneg as perpneg

    custom = api["custom"]
    positive, negative = conds
    return {
        "BasicGuider": custom.BasicGuider().get_guider(model, positive)[0],
        "CFGGuider": custom.CFGGuider().get_guider(model, positive, negative, 3.0)[0],
        "DualCFGGuider": custom.DualCFGGuider().get_guider(
            model, positive, negative, negative, 3.0, 1.5, "regular"
        )[0],
        "PerpNegGuider": perpneg.PerpNegGuider.execute(model, positive, negative, negative, 3.0, 1.0).result[
            0
        ],
    }


@pytest.mark.parametrize("guider_name", ["BasicGuider", "CFGGuider", "DualCFGGuider", "PerpNegGuider"])
def test_every_core_guider(api, tiny_comfy_model, tiny_comfy_conds, guider_name):
    guider = _guiders(api, tiny_comfy_model, tiny_comfy_conds)[guider_name]
    custom = api["custom"]
    with torch.inference_mode():
        out = custom.SamplerCustomAdvanced().sample(
            custom.Noise_RandomNoise(1),
            guider,
            _sampler(api, order=3, eta=0.5),
            _sigmas(api, tiny_comfy_model, steps=3),
            {"samples": torch.zeros(LATENT)},
        )
    assert torch.isfinite(out[0]["samples"]).all()


def test_sampler_custom_node(api, tiny_comfy_model, tiny_comfy_conds):
    positive, negative = tiny_comfy_conds
    with torch.inference_mode():
        out, denoised = (
            api["custom"]
            .SamplerCustom()
            .sample(
                tiny_comfy_model,
                True,
                3,
                2.0,
                positive,
                negative,
                _sampler(api, solver="singlestep", order=3),
                _sigmas(api, tiny_comfy_model, "time_uniform", 3),
                {"samples": torch.zeros(LATENT)},
            )
        )
    assert torch.isfinite(out["samples"]).all()
    torch.testing.assert_close(out["samples"], denoised["samples"])


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("corrector", ["none", "bh2"])
def test_split_sigmas_resumes_with_the_history_of_the_first_half(
    api, tiny_comfy_model, tiny_comfy_conds, order, corrector
):
    """SamplerCustomAdvanced -> SplitSigmas -> SamplerCustomAdvanced gives the one-run result: the
    second half picks up the first half's model outputs and keeps its order (and its UniC
    correction at the split; lower-order-final applies once, at the end). Without them (history
    cleared) it restarts at first order and lands elsewhere."""
    from comfyui_fewstep.samplers import history

    custom = api["custom"]
    sampler = _sampler(api, order=order, corrector=corrector)
    sigmas = _sigmas(api, tiny_comfy_model, steps=6)
    guider = _guider(api, tiny_comfy_model, tiny_comfy_conds, 2.0)
    latent = {"samples": torch.zeros(LATENT)}
    run = custom.SamplerCustomAdvanced().sample
    high, low = custom.SplitSigmas().get_sigmas(sigmas, 3)
    with torch.inference_mode():
        full = run(custom.Noise_RandomNoise(7), guider, sampler, sigmas, latent)[0]["samples"]
        first = run(custom.Noise_RandomNoise(7), guider, sampler, high, latent)[0]
        resumed = run(custom.Noise_EmptyNoise(), guider, sampler, low, first)[0]["samples"]
        history.clear()
        restarted = run(custom.Noise_EmptyNoise(), guider, sampler, low, first)[0]["samples"]
    scale = float(full.abs().max())
    assert float((resumed - full).abs().max()) < 1e-4 * scale
    assert float((restarted - full).abs().max()) > 1e-3 * scale


def test_adaptive_tolerances_reach_the_solver(api, tiny_comfy_model, tiny_comfy_conds, unet_counter):
    """The node's atol / rtol drive DPM-Solver++23's step control: tighter tolerances, more calls."""
    model = tiny_comfy_model.clone()
    model.set_model_unet_function_wrapper(unet_counter)
    sigmas = _sigmas(api, model, steps=2)
    calls = {}
    for tol in (0.05, 0.002):
        sampler = _sampler(api, solver="adaptive", order=3, atol=tol, rtol=tol)
        before = unet_counter.calls
        with torch.inference_mode():
            x = _guider(api, model, tiny_comfy_conds, 1.0).sample(_noise(), torch.zeros(LATENT), sampler, sigmas,
                                                                  disable_pbar=True, seed=0)
        assert torch.isfinite(x).all()
        calls[tol] = unet_counter.calls - before
    assert calls[0.002] > calls[0.05] >= 3


def _few_step_setup(api, tiny_comfy_model, unet_counter, flow):
    """The tiny model (eps, or flow with shift 3) with a call counter, and its few-step window of 6 calls."""
    import comfy.model_sampling as cms

    model = tiny_comfy_model.clone()
    if flow:
        sampling = type("FlowSampling", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})()
        sampling.set_parameters(shift=3.0)
        model.add_object_patch("model_sampling", sampling)
    model.set_model_unet_function_wrapper(unet_counter)
    sigmas = api["schedule_nodes"].FewStepSchedule.execute(
        model, "logsnr_window", 6, 1.0, lambda_start=-2.0, sigma_end=0.03).result[0]
    return model, sigmas


@pytest.mark.parametrize("final_weights", ["adams", "gaussian"])
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_few_step_preset_in_sampler_custom_advanced(api, tiny_comfy_model, tiny_comfy_conds, unet_counter,
                                                    flow, final_weights):
    """2M + UniC + the order-4 last step on the few-step window, through SamplerCustomAdvanced with
    cfg 2: one network pass per call and guidance branch, no extra call for the last step, and a
    result that is not the last prediction (the last step integrates instead of returning it)."""
    model, sigmas = _few_step_setup(api, tiny_comfy_model, unet_counter, flow)
    custom = api["custom"]
    with torch.inference_mode():
        out = custom.SamplerCustomAdvanced().sample(
            custom.Noise_RandomNoise(7),
            _guider(api, model, tiny_comfy_conds, 2.0),
            _sampler(api, corrector="bh2", final_order=4, final_weights=final_weights),
            sigmas,
            {"samples": torch.zeros(LATENT)},
        )
    samples, denoised = out[0]["samples"], out[1]["samples"]
    assert torch.isfinite(samples).all()
    assert unet_counter.calls == 6  # cond and uncond are batched into one pass per call
    assert (samples - denoised).abs().max() > 1e-4


@pytest.mark.parametrize(("option", "default", "value"),
                         [("second_step", "log_snr", "flow"), ("first_step", "ddim", "gaussian"),
                          ("first_step", "ddim", "skip")])
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_start_options_in_real_comfyui(api, tiny_comfy_model, tiny_comfy_conds, unet_counter, flow, option,
                                       default, value):
    """The few-step preset with second_step flow, or first_step gaussian or skip, through a CFG guider
    (cfg 2) on the model's own sigmas: the same model calls as without (skip: one fewer, none at the
    first sigma), a different result, and with a denoise mask (inpainting from full noise) the kept
    region is the source latent exactly, as without."""
    model, sigmas = _few_step_setup(api, tiny_comfy_model, unet_counter, flow)
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    outs, masked = {}, {}
    for choice in (default, value):
        sampler = _sampler(api, corrector="bh2", final_order=4, final_weights="gaussian", **{option: choice})
        before = unet_counter.calls
        with torch.inference_mode():
            outs[choice] = _guider(api, model, tiny_comfy_conds, 2.0).sample(
                _noise(), torch.zeros(LATENT), sampler, sigmas, disable_pbar=True, seed=0)
            masked[choice] = _guider(api, model, tiny_comfy_conds, 2.0).sample(
                _noise(), latent, sampler, sigmas, denoise_mask=mask, disable_pbar=True, seed=0)
        assert unet_counter.calls - before == (10 if choice == "skip" else 12)
        assert torch.isfinite(outs[choice]).all()
        torch.testing.assert_close(masked[choice][..., 4:], latent[..., 4:], rtol=1e-6, atol=1e-6)
    assert (outs[value] - outs[default]).abs().max() > 1e-5
    assert (masked[value][..., :4] - masked[default][..., :4]).abs().max() > 1e-5


def test_skip_start_falls_back_to_the_gaussian_first_step_above_cfg_7(api, tiny_comfy_model, tiny_comfy_conds,
                                                                      unet_counter, caplog):
    """Above SKIP_START_MAX_CFG (7) the skip start is unsafe (``bench/guidance_check.py``): the run takes the
    gaussian first step instead, with its call at the first sigma, and says so in the log; at cfg 7 it
    skips. The guider's scale is read from cfg and, for the dual-CFG guider, cfg1 / cfg2."""
    from comfyui_fewstep.nodes._comfy_sampler import SKIP_START_MAX_CFG, guidance_scale

    model, sigmas = _few_step_setup(api, tiny_comfy_model, unet_counter, False)
    outs = {}
    for cfg, first_step, calls in ((8.0, "gaussian", 6), (8.0, "skip", 6), (7.0, "skip", 5)):
        sampler = _sampler(api, corrector="bh2", final_order=4, final_weights="gaussian", first_step=first_step)
        before = unet_counter.calls
        caplog.clear()
        with caplog.at_level(logging.INFO), torch.inference_mode():
            outs[cfg, first_step] = _guider(api, model, tiny_comfy_conds, cfg).sample(
                _noise(), torch.zeros(LATENT), sampler, sigmas, disable_pbar=True, seed=0)
        assert unet_counter.calls - before == calls
        fell_back = (cfg, first_step) == (8.0, "skip")
        assert ("takes the gaussian first step instead" in caplog.text) == fell_back
    torch.testing.assert_close(outs[8.0, "skip"], outs[8.0, "gaussian"], rtol=0, atol=0)
    assert SKIP_START_MAX_CFG == 7.0
    dual = api["custom"].DualCFGGuider().get_guider(model, *tiny_comfy_conds, tiny_comfy_conds[1], 3.0, 9.0,
                                                    "regular")[0]
    assert guidance_scale(type("Wrapped", (), {"inner_model": dual})()) == 9.0
    assert guidance_scale(lambda x, s: x) is None


def test_denoise_mask_keeps_the_unmasked_latent_with_the_adams_last_step(api, tiny_comfy_model,
                                                                         tiny_comfy_conds):
    """The kept region is the source latent exactly as with the first-order last step (which
    returns ComfyUI's masked prediction), with either weights of the order-4 last step; only the
    repainted region differs, and the node's final_weights reaches the sampler."""
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    outs = {}
    for final_order, final_weights in ((1, "adams"), (4, "adams"), (4, "gaussian")):
        with torch.inference_mode():
            outs[final_order, final_weights] = _guider(api, tiny_comfy_model, tiny_comfy_conds, 2.0).sample(
                _noise(),
                latent,
                _sampler(api, corrector="bh2", final_order=final_order, final_weights=final_weights),
                _sigmas(api, tiny_comfy_model, steps=6, denoise=0.8),
                denoise_mask=mask,
                disable_pbar=True,
                seed=0,
            )
    first = outs[1, "adams"]
    for weights in ("adams", "gaussian"):
        out = outs[4, weights]
        torch.testing.assert_close(out[..., 4:], first[..., 4:], rtol=0, atol=0)
        torch.testing.assert_close(out[..., 4:], latent[..., 4:], rtol=1e-6, atol=1e-6)
        assert (out[..., :4] - first[..., :4]).abs().max() > 1e-4
        assert (out[..., :4] - latent[..., :4]).abs().max() > 1e-2
    assert (outs[4, "adams"][..., :4] - outs[4, "gaussian"][..., :4]).abs().max() > 1e-5
