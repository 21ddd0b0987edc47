"""Calibrate-steps and load-schedule nodes inside real ComfyUI, on a tiny random-weight SD1.5-type model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

LATENT = (1, 4, 8, 8)



@pytest.fixture()
def nodes(comfy, tmp_path, monkeypatch):
    import folder_paths
    from comfyui_fewstep.nodes import calibration_nodes

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    return calibration_nodes



def _calibrate(nodes, model, conds, **kw):
    args = {"model": model, "positive": conds[0], "latent_image": {"samples": torch.zeros(LATENT)}, "preset": "dpmpp_2m",
                "nfe": 4, "seeds": 2, "seed": 0, "cfg": 2.0, "grid_points": 16, "substeps": 1, "search_nfe": 8, "use_cache": True,
                "save_as": "", "negative": conds[1]}
    args.update(kw)
    return nodes.FewStepCalibrateSchedule.execute(**args)


class _ForwardCounter:
    """Counts UNet forward calls with a module hook: a counting model wrapper would itself be part
    of the model's fingerprint, and its changing count another model."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.diffusion_model.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.fixture()
def forward_counter(tiny_comfy_model):
    counter = _ForwardCounter(tiny_comfy_model)
    yield counter
    counter.handle.remove()


def test_calibrate_caches_and_drives_sampler_custom_advanced(nodes, tiny_comfy_model, tiny_comfy_conds, tmp_path,
                                                             forward_counter):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom

    counter = forward_counter
    model = tiny_comfy_model.clone()
    with torch.inference_mode():
        out = _calibrate(nodes, model, tiny_comfy_conds, save_as="tiny sd15 2m")
    sampler, sigmas, report = out.result
    assert report.startswith("calibrated") and "model calls" in report
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,) and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[0] == pytest.approx(14.6146, rel=1e-4)
    first = counter.calls
    # teacher (15 intervals x 1 substep + 1) + DP check + 4 fixed schedules + search, one call per model call (cfg batched)
    assert first >= 16 + 5 * 4
    cached = list((tmp_path / nodes.STORE_FOLDER / "cache").glob("*.json"))
    assert len(cached) == 1
    record = json.loads(cached[0].read_text())
    assert record["sigmas"] == pytest.approx(sigmas.tolist(), rel=1e-6) and record["cost"]["total_nfe"] > 0
    assert set(record) >= {"sigmas", "nfe", "solver", "model_hash", "settings", "cost", "created"}

    with torch.inference_mode():  # second run: from the cache, no model call
        again = _calibrate(nodes, model, tiny_comfy_conds)
    assert counter.calls == first and again.result[2].startswith("cached")
    torch.testing.assert_close(again.result[1], sigmas)

    loaded, info, loaded_sampler = nodes.FewStepLoadSchedule.execute("tiny sd15 2m").result
    torch.testing.assert_close(loaded, sigmas)
    assert "NFE 4" in info and loaded_sampler.extra_options["solver"] == "multistep"

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(*tiny_comfy_conds)
    guider.set_cfg(2.0)
    before = counter.calls
    with torch.inference_mode():
        samples = custom.SamplerCustomAdvanced().sample(
            custom.Noise_RandomNoise(3), guider, sampler, loaded, {"samples": torch.zeros(LATENT)})[0]["samples"]
    assert torch.isfinite(samples).all() and counter.calls - before == 4


def test_fitted_preset_calibrates_saves_loads_and_samples(nodes, tiny_comfy_model, tiny_comfy_conds, unet_counter):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom

    counter = unet_counter
    model = tiny_comfy_model.clone()
    model.set_model_unet_function_wrapper(counter)
    with torch.inference_mode():
        sampler, sigmas, report = _calibrate(nodes, model, tiny_comfy_conds, preset=nodes.FITTED_PRESET,
                                             save_as="tiny fitted").result
    assert report.startswith("calibrated") and nodes.FITTED_PRESET in report
    options = sampler.extra_options
    assert options["solver"] == "fitted" and len(options["coefficients"]) == 4
    assert options["fitted_sigmas"] == pytest.approx(sigmas.tolist(), rel=1e-6)
    loaded, _, loaded_sampler = nodes.FewStepLoadSchedule.execute("tiny fitted").result
    assert loaded_sampler.extra_options["coefficients"] == options["coefficients"]

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(*tiny_comfy_conds)
    guider.set_cfg(2.0)

    def sample(smp, sig):
        with torch.inference_mode():
            return custom.SamplerCustomAdvanced().sample(
                custom.Noise_RandomNoise(3), guider, smp, sig, {"samples": torch.zeros(LATENT)})[0]["samples"]

    before = counter.calls
    a, b = sample(sampler, sigmas), sample(loaded_sampler, loaded)
    assert counter.calls - before == 8 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    # the fitted weights belong to their schedule: other sigmas get a clear error, not a wrong image
    other = sigmas.clone()
    other[1] *= 0.9
    with pytest.raises(ValueError, match="calibrated for the sigmas"):
        sample(sampler, other)


def test_mean_start_preset_runs_one_more_step_and_keys_the_cache_by_prompt(nodes, tiny_comfy_model,
                                                                           tiny_comfy_conds, forward_counter):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom

    counter = forward_counter
    model = tiny_comfy_model.clone()
    preset = nodes.FITTED_MEAN_PRESET
    with torch.inference_mode():
        sampler, sigmas, report = _calibrate(nodes, model, tiny_comfy_conds, preset=preset,
                                             save_as="tiny mean start").result
    assert report.startswith("calibrated") and preset in report and "NFE 4" in report
    options = sampler.extra_options
    assert sigmas.shape == (6,) and len(options["coefficients"]) == 5
    assert options["first_prediction"].shape == (1, *LATENT[1:])
    loaded, info, loaded_sampler = nodes.FewStepLoadSchedule.execute("tiny mean start").result
    assert "NFE 4, 5 steps" in info
    torch.testing.assert_close(loaded_sampler.extra_options["first_prediction"], options["first_prediction"])

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(*tiny_comfy_conds)
    guider.set_cfg(2.0)

    def sample(smp, sig, latent=LATENT):
        with torch.inference_mode():
            return custom.SamplerCustomAdvanced().sample(
                custom.Noise_RandomNoise(3), guider, smp, sig, {"samples": torch.zeros(latent)})[0]["samples"]

    before = counter.calls
    a, b = sample(sampler, sigmas), sample(loaded_sampler, loaded)
    assert counter.calls - before == 8 and torch.isfinite(a).all()  # 4 calls per 5-step run (cfg batched)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="calibrate again at this image size"):
        sample(sampler, sigmas, (1, 4, 16, 16))
    # the mean first prediction is of the calibration prompt: another prompt is calibrated anew
    swapped = (tiny_comfy_conds[1], tiny_comfy_conds[0])
    with torch.inference_mode():
        again = _calibrate(nodes, model, tiny_comfy_conds, preset=preset).result[2]
        other = _calibrate(nodes, model, swapped, preset=preset).result[2]
    assert again.startswith("cached") and other.startswith("calibrated")


def test_changed_weights_miss_the_cache(nodes, tiny_comfy_model, tiny_comfy_conds):
    base = nodes.model_hash(tiny_comfy_model)
    other = tiny_comfy_model.clone()
    assert nodes.model_hash(other) == base  # a clone shares the weights
    w = next(other.model.parameters())
    with torch.no_grad():
        w.view(-1)[0] += 1.0
    try:
        assert nodes.model_hash(other) != base
    finally:
        with torch.no_grad():
            w.view(-1)[0] -= 1.0


def test_nan_model_gives_a_clear_error_and_caches_nothing(nodes, tiny_comfy_model, tiny_comfy_conds, tmp_path):
    model = tiny_comfy_model.clone()
    model.set_model_unet_function_wrapper(lambda apply_model, args: apply_model(
        args["input"], args["timestep"], **args["c"]) * float("nan"))
    with pytest.raises(ValueError, match="NaN/inf"), torch.inference_mode():
        _calibrate(nodes, model, tiny_comfy_conds)
    assert not list((tmp_path / nodes.STORE_FOLDER).rglob("*.json"))


def test_bad_settings_are_refused(nodes, tiny_comfy_model, tiny_comfy_conds):
    with pytest.raises(ValueError, match="too few calibration evaluations"), torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, nfe=8, grid_points=16)
    with pytest.raises(ValueError, match="cannot be calibrated"):
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset="dpmpp_2m_sde")
    with pytest.raises(ValueError, match="no saved schedules yet"):
        nodes.FewStepLoadSchedule.execute("")
    counter = _ForwardCounter(tiny_comfy_model)
    with pytest.raises(ValueError, match="name '../evil' is not allowed"), torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, save_as="../evil")
    counter.handle.remove()
    assert counter.calls == 0  # refused before any model call


def test_edited_sigmas_past_the_model_range_and_the_top_seed(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                             tmp_path):
    """A saved schedule whose first sigma was edited past the connected model's sigma_max is
    refused even when the file records its model; seeds at the top of ComfyUI's range wrap."""
    with torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, save_as="plain", seed=2**64 - 1, seeds=2)
    path = tmp_path / nodes.STORE_FOLDER / "plain.json"
    data = json.loads(path.read_text())
    assert data["settings"]["parameterization"]
    data["sigmas"][0] *= 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="above the connected model's sigma_max.*edited"):
        nodes.FewStepLoadSchedule.execute("plain", model=tiny_comfy_model)


def test_load_schedule_refuses_solver_fields_that_cannot_run(nodes, tmp_path):
    """A hand-edited or damaged file is refused when it is loaded, naming the file, not later
    inside the sampler node; a file with sigmas only runs as 2M and says so."""
    folder = tmp_path / nodes.STORE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    sigmas = [14.6, 2.0, 0.3, 0.0]
    bad = {
        "order7": {"sigmas": sigmas, "solver": {"solver": "multistep", "options": {"order": 7}}},
        "no orders": {"sigmas": sigmas, "solver": {"solver": "singlestep", "options": {"order": 2}},
                      "orders": []},
    }
    for name, record in bad.items():
        (folder / f"{name}.json").write_text(json.dumps(record))
        match = f"schedule '{name}' \\({name}.json\\) cannot run: .*Calibrate it again"
        with pytest.raises(ValueError, match=match):
            nodes.FewStepLoadSchedule.execute(name)
    (folder / "plain.json").write_text(json.dumps({"sigmas": sigmas}))
    loaded, info, _sampler = nodes.FewStepLoadSchedule.execute("plain").result
    assert loaded.tolist() == pytest.approx(sigmas) and "DPM-Solver++(2M)" in info
    # options without a solver name run as multistep with those options, and info says which
    (folder / "order3.json").write_text(json.dumps({"sigmas": sigmas, "solver": {"options": {"order": 3}}}))
    _, info, sampler = nodes.FewStepLoadSchedule.execute("order3").result
    assert sampler.extra_options["order"] == 3 and "multistep {'order': 3} (the file names no solver)" in info


def test_load_schedule_without_a_name_lists_the_saved_ones(nodes, tmp_path, caplog):
    """A node added before any schedule existed has name ""; once schedules exist, the message names
    them instead of saying there are none. Loading logs nothing about the user's model's history."""
    folder = tmp_path / nodes.STORE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.json").write_text(json.dumps({"sigmas": [14.6, 5.0, 1.0, 0.0]}))
    with pytest.raises(ValueError, match="no schedule chosen: pick one of the saved schedules \\(mine\\)"):
        nodes.FewStepLoadSchedule.execute("")
    with caplog.at_level(logging.INFO):
        nodes.FewStepLoadSchedule.execute("mine")
    assert not [r for r in caplog.records if "sigma_max" in r.getMessage()]


def test_target_is_part_of_the_settings_and_the_cache_key(nodes, tiny_comfy_model, tiny_comfy_conds, tmp_path):
    with torch.inference_mode():
        ode = _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds).result  # default: the ODE's solution at 0
        at_min = _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, target="sigma_min").result
    assert ode[2].startswith("calibrated") and at_min[2].startswith("calibrated")  # no cache hit across targets
    assert "(target ode)" in ode[2] and "(target sigma_min)" in at_min[2]
    records = [json.loads(f.read_text()) for f in (tmp_path / nodes.STORE_FOLDER / "cache").glob("*.json")]
    assert sorted(r["settings"]["target"] for r in records) == ["ode", "sigma_min"]
    with pytest.raises(ValueError, match="teacher end must be one of"), torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, target="zero")


def _lora(model, strength, seed=0):
    """A real kohya-style LoRA on one attention projection, applied with ComfyUI's own loader."""
    import comfy.lora
    import comfy.sd

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    name, target = next((k, v) for k, v in sorted(key_map.items()) if k.startswith("lora_unet_") and "attn1_to_q" in k)
    rows, cols = model.model.state_dict()[target].shape
    g = torch.Generator().manual_seed(seed)
    lora = {f"{name}.lora_up.weight": torch.randn(rows, 4, generator=g), f"{name}.lora_down.weight":
            torch.randn(4, cols, generator=g), f"{name}.alpha": torch.tensor(4.0)}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def test_lora_model_hits_its_cache_after_running_and_leaves_the_base_hash_alone(
        nodes, tiny_comfy_model, tiny_comfy_conds):
    """ComfyUI patches the loaded clone's weights in place (a random patch id per add_patches): the
    fingerprint reads the unpatched weights and the patches by content, so it is the same before
    and after a run, for a rebuilt identical LoRA (another session), and for the base model."""
    base = nodes.model_hash(tiny_comfy_model)
    lora = _lora(tiny_comfy_model, 0.8)
    before = nodes.model_hash(lora)
    assert before != base
    with torch.inference_mode():
        first = _calibrate(nodes, lora, tiny_comfy_conds).result[2]
        again = _calibrate(nodes, lora, tiny_comfy_conds).result[2]
    assert first.startswith("calibrated") and again.startswith("cached")
    assert nodes.model_hash(lora) == before == nodes.model_hash(_lora(tiny_comfy_model, 0.8))
    assert nodes.model_hash(tiny_comfy_model) == base  # its weights are patched in place right now
    assert nodes.model_hash(_lora(tiny_comfy_model, 0.7)) != before
    assert nodes.model_hash(_lora(tiny_comfy_model, 0.8, seed=1)) != before


def test_model_patches_and_prediction_type_change_the_cache_key(nodes, tiny_comfy_model, tiny_comfy_conds):
    """A wrapper, an attention or CFG patch, or another prediction type is another denoiser."""
    import comfy_extras.nodes_model_advanced as advanced

    base = nodes.model_hash(tiny_comfy_model)
    hashes = {base}
    for patch in ("set_model_sampler_cfg_function", "set_model_unet_function_wrapper"):
        m = tiny_comfy_model.clone()
        getattr(m, patch)(lambda args: args["cond"] if isinstance(args, dict) else args)
        hashes.add(nodes.model_hash(m))
    scaled = tiny_comfy_model.clone()
    scaled.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k * 0.5, v))
    hashes.add(nodes.model_hash(scaled))
    halved = tiny_comfy_model.clone()
    halved.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k * 0.25, v))
    hashes.add(nodes.model_hash(halved))
    v_pred = advanced.ModelSamplingDiscrete().patch(tiny_comfy_model, "v_prediction", False)[0]
    eps = advanced.ModelSamplingDiscrete().patch(tiny_comfy_model, "eps", False)[0]
    hashes |= {nodes.model_hash(v_pred), nodes.model_hash(eps)}
    assert len(hashes) == 7
    assert nodes.model_hash(advanced.ModelSamplingDiscrete().patch(tiny_comfy_model, "v_prediction", False)[0]) \
        == nodes.model_hash(v_pred)


def test_load_schedule_checks_the_connected_model(nodes, tiny_comfy_model, tiny_comfy_conds):
    """A shared schedule on another model family or sigma range is refused; on other weights (a
    LoRA here) it loads with a note; without a model connected nothing is checked."""
    import comfy_extras.nodes_model_advanced as advanced

    with torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset=nodes.FITTED_PRESET, save_as="shared")
    sigmas, info, _ = nodes.FewStepLoadSchedule.execute("shared", model=tiny_comfy_model).result
    assert "another model" not in info and sigmas[0] == pytest.approx(14.6146, rel=1e-4)
    _, info, _ = nodes.FewStepLoadSchedule.execute("shared", model=_lora(tiny_comfy_model, 0.8)).result
    assert "calibrated on another model" in info and "fitted coefficients" in info
    flow = advanced.ModelSamplingSD3().patch(tiny_comfy_model, 3.0)[0]
    with pytest.raises(ValueError, match="calibrated for eps models with sigmas 0.0291.*14.61, "
                                         "but the connected model is flow.*Calibrate this model"):
        nodes.FewStepLoadSchedule.execute("shared", model=flow)
    v_pred = advanced.ModelSamplingDiscrete().patch(tiny_comfy_model, "v_prediction", False)[0]
    with pytest.raises(ValueError, match="connected model is v"):
        nodes.FewStepLoadSchedule.execute("shared", model=v_pred)
    assert nodes.FewStepLoadSchedule.execute("shared").result[0].shape == sigmas.shape
    # ComfyUI asks for the fingerprint with every input; with a model connected it must still
    # answer (an exception there makes the node rerun, and everything after it, on every queue)
    fingerprint = nodes.FewStepLoadSchedule.fingerprint_inputs(name="shared", model=tiny_comfy_model)
    assert fingerprint and fingerprint == nodes.FewStepLoadSchedule.fingerprint_inputs(name="shared")


def test_load_schedule_older_fingerprint_and_removed_coefficients(nodes, tiny_comfy_model, tiny_comfy_conds):
    """A file saved before the model fingerprint changed is not called another model's; a fitted file
    whose coefficients were removed (to edit its sigmas, as the refusal of an edited file advises)
    runs its sigmas with plain DPM-Solver++(2M) and says so."""
    with torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset=nodes.FITTED_PRESET, save_as="versioned")
    path = nodes.schedule_store().path_for("versioned")
    data = json.loads(path.read_text())
    assert data["fingerprint_version"] == nodes.FINGERPRINT_VERSION >= 2
    old = dict(data, model_hash="0" * 64)
    del old["fingerprint_version"]
    nodes.schedule_store().path_for("older").write_text(json.dumps(old))
    _, info, _ = nodes.FewStepLoadSchedule.execute("older", model=tiny_comfy_model).result
    assert "earlier FewStep version" in info and "another model" not in info
    _, info, _ = nodes.FewStepLoadSchedule.execute("older", model=_lora(tiny_comfy_model, 0.8)).result
    assert "earlier FewStep version" in info
    # a cache entry written before the version was stored is of this model (its key holds the
    # current fingerprint): saving it from the cache records the current version
    for entry in nodes.schedule_store().cache_dir.glob("*.json"):
        cached = json.loads(entry.read_text())
        del cached["fingerprint_version"]
        entry.write_text(json.dumps(cached))
    with torch.inference_mode():
        report = _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset=nodes.FITTED_PRESET,
                            save_as="resaved").result[2]
    assert report.startswith("cached")
    assert json.loads(nodes.schedule_store().path_for("resaved").read_text())["fingerprint_version"] == \
        nodes.FINGERPRINT_VERSION
    edited = dict(data, sigmas=[data["sigmas"][0], *(0.9 * v for v in data["sigmas"][1:])])
    nodes.schedule_store().path_for("edited").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="remove 'coefficients' to run the sigmas with plain DPM-Solver"):
        nodes.FewStepLoadSchedule.execute("edited")
    del edited["coefficients"]
    nodes.schedule_store().path_for("edited").write_text(json.dumps(edited))
    sigmas, info, sampler = nodes.FewStepLoadSchedule.execute("edited").result
    assert "plain DPM-Solver++(2M)" in info
    assert sigmas.tolist() == pytest.approx(edited["sigmas"], rel=1e-6)
    options = sampler.extra_options
    assert options.get("solver", "multistep") == "multistep" and options["order"] == 2


def test_calibrated_singlestep_runs_on_split_sigmas_and_refuses_others(nodes, tiny_comfy_model, tiny_comfy_conds):
    """A calibrated 3S schedule has one order per interval: each SplitSigmas part runs with its own
    orders (the two parts use the same model calls as the whole); other sigmas get a clear error."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom

    with torch.inference_mode():
        sampler, sigmas, _ = _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset="dpmpp_3s", nfe=5).result
    guider = comfy.samplers.CFGGuider(tiny_comfy_model)
    guider.set_conds(*tiny_comfy_conds)
    guider.set_cfg(2.0)
    run = custom.SamplerCustomAdvanced().sample
    latent = {"samples": torch.zeros(LATENT)}
    high, low = custom.SplitSigmas().get_sigmas(sigmas, 1)
    with torch.inference_mode():
        whole = run(custom.Noise_RandomNoise(3), guider, sampler, sigmas, latent)[0]["samples"]
        first = run(custom.Noise_RandomNoise(3), guider, sampler, high, latent)[0]
        second = run(custom.Noise_EmptyNoise(), guider, sampler, low, first)[0]["samples"]
    torch.testing.assert_close(second, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    other = sigmas.clone()
    other[1] *= 0.9
    with pytest.raises(ValueError, match="singlestep sampler was calibrated for the sigmas"), torch.inference_mode():
        run(custom.Noise_RandomNoise(3), guider, sampler, other, latent)


def test_refinement_runs_on_comfy_weights_in_chunks_and_keys_the_cache(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                                      forward_counter):
    """The end-to-end refinement runs on ComfyUI's inference-tensor weights (forward calls only),
    lowers the calibration error, is part of the cache key, and every model call on the seeds is
    made 16 samples at a time."""
    model = tiny_comfy_model.clone()
    assert nodes.compute_dtype(model) == torch.float32
    seeds = 2 * nodes.CALIBRATION_CHUNK
    assert seeds >= nodes.MIN_REFINE_SEEDS
    settings = dict(preset=nodes.FITTED_MEAN_PRESET, nfe=3, seeds=seeds, grid_points=16, substeps=1,
                    search_nfe=0, negative=None)
    with torch.inference_mode():
        plain = _calibrate(nodes, model, tiny_comfy_conds, **settings).result[2]
        before = forward_counter.calls
        sampler, sigmas, report = _calibrate(nodes, model, tiny_comfy_conds, refine_iterations=2,
                                             **settings).result
    assert plain.startswith("calibrated") and report.startswith("calibrated")  # not the plain one's cache entry
    store = nodes.schedule_store()
    cached = [store.get(p.stem) for p in store.cache_dir.glob("*.json")]
    assert sorted(r.settings.get("refine_iterations", 0) for r in cached) == [0, 2]
    cost = _report_cost(report)
    assert cost["refine"] > 0 and cost["total"] == cost["teacher"] + cost["search"] + cost["refine"]
    assert forward_counter.calls - before == cost["total"] * 2  # two chunks per model call
    assert _report_error(report) < _report_error(plain)
    assert sigmas.shape == (5,) and len(sampler.extra_options["coefficients"]) == 4
    with torch.inference_mode():
        again = _calibrate(nodes, model, tiny_comfy_conds, refine_iterations=2, **settings).result[2]
    assert again.startswith("cached")


def test_refinement_settings_are_refused_before_any_model_call(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                               forward_counter):
    with torch.inference_mode():
        with pytest.raises(ValueError, match=f"at least {nodes.MIN_REFINE_SEEDS} calibration seeds"):
            _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, preset=nodes.FITTED_PRESET,
                       seeds=nodes.MIN_REFINE_SEEDS - 1, refine_iterations=3)
        with pytest.raises(ValueError, match="refines the fitted solver only"):
            _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, seeds=nodes.MIN_REFINE_SEEDS,
                       refine_iterations=3)
    assert forward_counter.calls == 0


def _report_cost(report: str) -> dict[str, int]:
    import re

    pattern = r"cost (\d+) model calls on \d+ seeds \((\d+) teacher \+ (\d+) search \+ (\d+) refinement\)"
    m = re.search(pattern, report)
    assert m, report
    return dict(zip(("total", "teacher", "search", "refine"), map(int, m.groups())))


def _report_error(report: str) -> float:
    import re

    return float(re.search(r"calibration error ([0-9.e+-]+)", report).group(1))


def test_running_out_of_memory_says_what_to_lower_and_caches_nothing(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                                     monkeypatch):
    import comfy.model_management

    def no_memory(*args, **kwargs):
        raise nodes.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(nodes, "calibrate", no_memory)
    with pytest.raises(comfy.model_management.OOM_EXCEPTION) as info, torch.inference_mode():
        _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, seeds=64, grid_points=100)
    message = str(info.value)
    assert "nothing was cached" in message and "lower seeds or grid_points" in message
    assert "0.01 GiB for 64 seeds, 100 grid points and latents of shape [4, 8, 8]" in message
    assert "Tried to allocate 12.00 GiB" in message
    assert not list(nodes.schedule_store().cache_dir.glob("*.json"))


def test_a_device_without_float64_is_refused_before_any_model_call(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                                   forward_counter):
    model = tiny_comfy_model.clone()
    model.load_device = torch.device("mps")  # only the device's name is read before the refusal
    with pytest.raises(ValueError, match="Apple MPS does not support.*--cpu.*FewStep Load Schedule"), \
            torch.inference_mode():
        _calibrate(nodes, model, tiny_comfy_conds)
    assert forward_counter.calls == 0


def test_calibration_reports_progress_and_stops_when_cancelled(nodes, tiny_comfy_model, tiny_comfy_conds,
                                                               forward_counter):
    """Every model call moves ComfyUI's progress bar toward the expected total, which it reaches when
    done; cancelling the prompt (ComfyUI's interrupt) stops the calibration at the next model call
    and caches nothing."""
    import comfy.model_management
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kw: seen.append((value, total)))
    try:
        with torch.inference_mode():
            _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, nfe=3)
        spec = nodes._spec("dpmpp_2m")
        total = nodes.expected_calls(spec, 3, grid_points=16, substeps=1, search_nfe=8)
        assert seen[-1] == (total, total) and {t for _, t in seen} == {total}
        values = [v for v, _ in seen]
        assert values == sorted(values) and len(values) == forward_counter.calls + 1  # one per call, then done

        def cancel_after(value, total, *args, **kw):
            if value >= 5:
                comfy.model_management.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(cancel_after)
        before = forward_counter.calls
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            _calibrate(nodes, tiny_comfy_model, tiny_comfy_conds, nfe=3, use_cache=False, seed=1)
        assert forward_counter.calls - before == 5
        assert len(list(nodes.schedule_store().cache_dir.glob("*.json"))) == 1  # the first run's only
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
