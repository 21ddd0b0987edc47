"""Students through real ComfyUI: a full-size random-weight SD1.5 UNet in each file format loads via
our loader and samples one step on CPU; LoRA students patch every module; bad files fail cleanly."""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from comfyui_fewstep.distill_loaders import keys as K
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.lcm_guidance import guidance_scale_embedding
from comfyui_fewstep.distill_loaders.recipes import alphas_cumprod, ddpm_sigma, recipe_sigmas
from comfyui_fewstep.distill_loaders.synthetic import (
    kohya_lora_shapes,
    peft_lora_shapes,
    processor_lora_shapes,
)
from safetensors.torch import save_file

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

LATENT = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def sd15_diffusers():
    """Full-size SD1.5 UNet, diffusers names, random fp16 weights (std 0.02, norms 1)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in K.diffusers_unet_shapes("sd15").items():
        if "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(shape, dtype=torch.float16)
        else:
            sd[k] = (torch.randn(shape, generator=g) * 0.02).half()
    return sd


@pytest.fixture(scope="module")
def files(sd15_diffusers, tmp_path_factory):
    d = tmp_path_factory.mktemp("students")
    save_file(sd15_diffusers, str(d / "dmd2_sd15_unet.safetensors"))
    ldm, _ = K.convert_diffusers_to_ldm(sd15_diffusers, "sd15", prefix="model.diffusion_model.")
    save_file(ldm, str(d / "instaflow_0_9B_unet.safetensors"))
    del ldm
    torch.save(sd15_diffusers, d / "batch512_cfg222_t625_v2.bin")
    lcm = dict(sd15_diffusers)
    lcm["time_embedding.cond_proj.weight"] = (
        torch.randn(320, 256, generator=torch.Generator().manual_seed(5)).half() * 0.02
    )
    save_file(lcm, str(d / "LCM_Dreamshaper_v7_unet.safetensors"))
    del lcm
    gc.collect()
    return d


def _sample(comfy_mods, model, sampler, sigmas, seed=0):
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    cond = [[torch.zeros(1, 77, 768), {}]]
    return comfy_mods.sample.sample_custom(
        model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros(LATENT), disable_pbar=True, seed=seed
    )


@pytest.fixture(scope="module")
def api(comfy):
    import comfy.sample
    import folder_paths
    from comfyui_fewstep.nodes import student_nodes

    class A:
        pass

    a = A()
    a.sample, a.folder_paths, a.nodes = comfy.sample, folder_paths, student_nodes
    return a


@pytest.mark.parametrize(
    "name, recipe, timestep, input_std",
    [
        ("dmd2_sd15_unet.safetensors", "dmd2_sd15_1step", 999, 1.0),  # diffusers safetensors
        ("instaflow_0_9B_unet.safetensors", "instaflow_sd15_1step", 1000, 1.0),  # LDM UNet, flow
        (
            "batch512_cfg222_t625_v2.bin",
            "sid_lsg_sd15_1step",
            625,
            math.sqrt(1 - 1 / (1 + ddpm_sigma(625) ** 2)),
        ),  # .bin
        ("LCM_Dreamshaper_v7_unet.safetensors", "lcm", 999, 1.0),  # LCM with w-embedding
    ],
)
def test_full_size_sd15_student_loads_and_samples(
    api, files, sd15_diffusers, name, recipe, timestep, input_std
):
    model, clip, vae, sampler, sigmas, info = api.nodes.load_student_model(files / name)
    assert f"recipe:      {recipe}" in info and clip is None and vae is None
    ms = model.get_model_object("model_sampling")
    # ComfyUI holds our weights under its names (the diffusers -> LDM conversion is right).
    unet = model.model.diffusion_model
    torch.testing.assert_close(
        unet.input_blocks[0][0].weight.float(), sd15_diffusers["conv_in.weight"].float()
    )
    torch.testing.assert_close(
        unet.output_blocks[11][1].transformer_blocks[0].attn2.to_k.weight.float(),
        sd15_diffusers["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"].float(),
    )
    ldm, _ = K.convert_diffusers_to_ldm(sd15_diffusers, "sd15")  # every parameter holds its weight
    params = unet.state_dict()
    assert set(params) == set(ldm)
    assert all(torch.equal(params[k].to(v.dtype), v) for k, v in ldm.items())
    del ldm, params
    assert float(ms.timestep(sigmas[:1])) == pytest.approx(timestep, abs=1e-3)
    # first-step noise as the student expects it at the network input
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    x = ms.noise_scaling(sigmas[:1], z, torch.zeros_like(z), False)
    std = ms.calculate_input(sigmas[:1], x).std().item()
    assert std == pytest.approx(input_std, rel=0.02)
    out = _sample(api, model, sampler, sigmas)
    assert out.shape == LATENT and bool(torch.isfinite(out).all()) and out.abs().max() > 0
    if recipe == "lcm":
        assert "LCM guidance embedding: w = 8.5" in info
        patched = model.object_patches["diffusion_model.time_embed"]
        t_emb = torch.randn(2, 320)
        w_emb = patched.cond_proj(guidance_scale_embedding(torch.full((2,), 7.5), 256))  # w - 1
        assert isinstance(patched.time_embed, torch.nn.Sequential)  # wraps the UNet's own time_embed
        torch.testing.assert_close(patched(t_emb), patched.time_embed(t_emb + w_emb))
    if recipe.startswith("instaflow"):  # velocity noise -> data: denoised = x + sigma v
        v, xin = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        torch.testing.assert_close(ms.calculate_denoised(torch.tensor([0.5]), v, xin), xin + 0.5 * v)
    del model
    gc.collect()


def test_student_loads_with_a_dtype_cast_under_inference_mode(api, files, sd15_diffusers):
    """ComfyUI runs nodes under torch.inference_mode: a float16 file loaded into a float32 model
    there takes the loader's cast path into inference tensors."""
    with torch.inference_mode():
        model, *_ = api.nodes.load_student_model(
            files / "dmd2_sd15_unet.safetensors", model_options={"dtype": torch.float32}
        )
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.dtype == torch.float32 and weight.is_inference()
    torch.testing.assert_close(weight, sd15_diffusers["conv_in.weight"].float(), rtol=0, atol=0)
    del model
    gc.collect()


def test_lora_students_patch_every_module(api, files, tmp_path):
    base, *_ = api.nodes.load_student_model(files / "dmd2_sd15_unet.safetensors")
    g = torch.Generator().manual_seed(2)
    for name, shapes in (
        ("lcm-lora-sdv1-5.safetensors", kohya_lora_shapes("sd15", 4)),
        ("lcm_processor_lora.safetensors", processor_lora_shapes("sd15", 4)),
        ("Hyper-SD15-4steps-lora.safetensors", peft_lora_shapes("sd15", 4)),
    ):
        tensors = {
            k: (torch.randn(s, generator=g) * 0.01 if s else torch.tensor(4.0)) for k, s in shapes.items()
        }
        save_file(tensors, str(tmp_path / name))
        model, _, _, _sampler, sigmas, info = api.nodes.load_student_model(tmp_path / name, model=base)
        n_modules = len({k.rsplit(".", 2)[0] for k in shapes})
        assert f"LoRA: {n_modules} modules patched" in info
        assert len(model.patches) == n_modules
    assert "recipe:      hyper_4step_lora" in info and len(sigmas) == 5
    # the info describes the run the outputs make: 8 steps asked, 8 steps reported
    lcm = tmp_path / "lcm-lora-sdv1-5.safetensors"
    _, _, _, _, sigmas, info = api.nodes.load_student_model(lcm, model=base, steps=8)
    assert len(sigmas) == 9 and "lcm_lora: lcm prediction, 8 step(s)" in info
    timesteps = next(line for line in info.splitlines() if line.startswith("timesteps:"))
    assert timesteps.count(",") == 7
    sdxl = {k: torch.zeros(s) for k, s in kohya_lora_shapes("sdxl", 1).items()}
    save_file(sdxl, str(tmp_path / "dmd2_sdxl_4step_lora.safetensors"))
    with pytest.raises(StudentLoadError, match="LoRA is for sdxl but the model it is applied to is sd15"):
        api.nodes.load_student_model(tmp_path / "dmd2_sdxl_4step_lora.safetensors", model=base)
    # a LoRA whose name says nothing: the base mismatch is still the message, not "not identified"
    save_file(sdxl, str(tmp_path / "my_lora.safetensors"))
    with pytest.raises(StudentLoadError, match="LoRA is for sdxl but the model it is applied to is sd15"):
        api.nodes.load_student_model(tmp_path / "my_lora.safetensors", model=base)
    with pytest.raises(StudentLoadError, match="connect the base MODEL"):
        api.nodes.load_student_model(tmp_path / "lcm-lora-sdv1-5.safetensors")


@pytest.mark.parametrize(
    ("sampling", "zsnr", "message"),
    [("v_prediction", True, "it is a v-prediction model"), ("eps", True, "zero terminal SNR"),
     ("edm", None, "it is an EDM model"), ("eps", None, "not SD's discrete noise schedule")],
)
def test_lora_student_refuses_a_base_that_samples_otherwise(api, files, tmp_path, sampling, zsnr, message):
    """A LoRA student's recipe replaces the base's sampling; on a v-prediction or zero-terminal-SNR
    fine-tune that silently sampled the network as an eps model."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete

    base, *_ = api.nodes.load_student_model(files / "dmd2_sd15_unet.safetensors")
    if zsnr is None:  # continuous (EDM-style) sampling, as for Playground v2.5
        patched = ModelSamplingContinuousEDM().patch(base, sampling, 80.0, 0.002)[0]
    else:
        patched = ModelSamplingDiscrete().patch(base, sampling, zsnr)[0]
    assert api.nodes.base_sampling_mismatch(base) is None
    shapes = kohya_lora_shapes("sd15", 4)
    save_file({k: torch.zeros(s) if s else torch.tensor(4.0) for k, s in shapes.items()},
              str(tmp_path / "lcm-lora-sdv1-5.safetensors"))
    with pytest.raises(StudentLoadError, match=message) as caught:
        api.nodes.load_student_model(tmp_path / "lcm-lora-sdv1-5.safetensors", model=patched)
    assert "LoraLoaderModelOnly" in str(caught.value)


def test_node_execute_and_errors(api, files, tmp_path):
    api.folder_paths.add_model_folder_path("diffusion_models", str(files))
    api.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    node = api.nodes.FewStepStudentLoader
    schema = node.define_schema()
    assert schema.node_id == "FewStepStudentLoader"
    out = node.execute("diffusion_models/dmd2_sd15_unet.safetensors", "auto", 0).result
    assert out[2].tolist() == pytest.approx([ddpm_sigma(999), 0.0], rel=1e-6)
    with pytest.raises(StudentLoadError, match="broken.safetensors.*What to do"):
        node.execute("diffusion_models/broken.safetensors", "auto", 0)
    with pytest.raises(StudentLoadError, match="is for sdxl but the file is a sd15 model"):
        node.execute("diffusion_models/dmd2_sd15_unet.safetensors", "dmd2_sdxl_1step", 0)


def test_student_sampling_objects(api):
    import comfy.supported_models
    from comfyui_fewstep.distill_loaders.specs import get_recipe

    cfg = comfy.supported_models.SD15(
        {
            "context_dim": 768,
            "model_channels": 320,
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
        }
    )
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    for name, expected_std in (("dmd2_sdxl_1step", 1.0), ("hyper_sdxl_1step_unet", 1.0)):
        recipe = get_recipe(name)
        ms = api.nodes.student_model_sampling(recipe, cfg)
        sigma = torch.tensor([ddpm_sigma(recipe.timesteps[0])])
        x = ms.noise_scaling(sigma, z, torch.zeros_like(z), False)
        torch.testing.assert_close(ms.calculate_input(sigma, x), z, rtol=1e-5, atol=1e-5)
    ms = api.nodes.student_model_sampling(get_recipe("lcm_lora"), cfg)
    assert [int(ms.timestep(torch.tensor([ddpm_sigma(t)]))) for t in (999, 759, 499, 259)] == [
        999,
        759,
        499,
        259,
    ]
    x0_ms = api.nodes.student_model_sampling(get_recipe("sdxl_lightning_1step_x0"), cfg)
    out = torch.randn(1, 4, 2, 2)
    assert torch.equal(x0_ms.calculate_denoised(torch.tensor([14.6]), out, torch.zeros_like(out)), out)
    # SwiftBrush's predict_original: x0 = (z - sqrt(1 - 0.0047) eps) / sqrt(0.0047) from unit noise z
    recipe = get_recipe("swiftbrush_sd21_1step")
    ms = api.nodes.student_model_sampling(recipe, cfg)
    sigma = recipe_sigmas(recipe)[:1].float()
    x = ms.noise_scaling(sigma, z, torch.zeros_like(z), False)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    own = (z - math.sqrt(1 - 0.0047) * eps) / math.sqrt(0.0047)
    torch.testing.assert_close(ms.calculate_denoised(sigma, eps, x), own, rtol=1e-5, atol=1e-4)
    schedule = (z - math.sqrt(1 - alphas_cumprod(999)) * eps) / math.sqrt(alphas_cumprod(999))
    assert not torch.allclose(schedule, own, rtol=1e-3, atol=0)  # the 0.4% the recipe exists for
    half = torch.tensor([1.0])  # any other sigma: the schedule's EPS conversion
    torch.testing.assert_close(ms.calculate_denoised(half, eps, x), x - eps, rtol=0, atol=0)


def test_edm_generator_node(api, tmp_path, tiny_edm):
    import pickle

    from comfyui_fewstep.distill_loaders.convert_pickle import convert

    net = tiny_edm("SongUNet")
    src = tmp_path / "sid-network-snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": {f"model.{k}": v for k, v in net.state_dict().items()}}))
    convert(src, tmp_path / "sid_cifar10_cond.safetensors")
    api.folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    images, info = api.nodes.FewStepEDMGenerator.execute(
        "checkpoints/sid_cifar10_cond.safetensors", 3, 2, 7
    ).result
    assert images.shape == (2, 16, 16, 3) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert "recipe:      sid_edm_1step" in info and "sigma_init: 2.5" in info
    again, _ = api.nodes.FewStepEDMGenerator.execute(
        "checkpoints/sid_cifar10_cond.safetensors", 3, 2, 7
    ).result
    assert torch.equal(images, again)
    with pytest.raises(StudentLoadError, match="not an EDM pixel generator"):
        api.nodes.generate_edm_images(_latent_file(tmp_path))
    # the latent loader names the node to use, whatever its steps input says
    for steps in (0, 2):
        with pytest.raises(StudentLoadError, match="EDM pixel-space generator.*load it with 'EDM One-Step"):
            api.nodes.load_student(tmp_path / "sid_cifar10_cond.safetensors", steps=steps)
    # a file that is an EDM generator by its keys but incomplete: a load error naming the file
    from safetensors.torch import save_file

    sd = net.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("dec.")}
    save_file(partial, tmp_path / "sid_partial.safetensors")
    with pytest.raises(StudentLoadError, match=r"sid_partial\.safetensors.*not a complete SiD/DMD2 EDM generator"):
        api.nodes.generate_edm_images(tmp_path / "sid_partial.safetensors")


def test_edm_generator_node_reads_dmd2s_plain_state_dict(api, tmp_path, tiny_edm):
    """DMD2's ImageNet generator ships as ``pytorch_model.bin``: an EDMPrecond state dict with the
    network under ``model.``; it runs unconverted, at DMD2's sigma 80."""
    from comfyui_fewstep.distill_loaders.edm_networks import generate_one_step

    net = tiny_edm("DhariwalUNet")
    folder = tmp_path / "in64"
    folder.mkdir()
    torch.save({f"model.{k}": v for k, v in net.state_dict().items()}, folder / "pytorch_model.bin")
    api.folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    images, info = api.nodes.FewStepEDMGenerator.execute("checkpoints/in64/pytorch_model.bin", 5, 2, 3).result
    assert "recipe:      dmd2_imagenet_1step" in info and "sigma_init: 80" in info
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = (generate_one_step(net, z, 80.0, torch.eye(10)[[3, 3]]) + 1) / 2
    torch.testing.assert_close(images, expected.permute(0, 2, 3, 1), atol=1e-5, rtol=0)


def _latent_file(tmp_path):
    from comfyui_fewstep.distill_loaders.synthetic import unet_shapes, write_safetensors

    return write_safetensors(tmp_path / "dmd2_sd15.safetensors", unet_shapes("sd15", "diffusers"))


def _make_test_models():
    """tools/make_test_models.py, imported by path (it needs only torch and safetensors)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "make_test_models.py"
    spec = importlib.util.spec_from_file_location("fewstep_make_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_step_sample_node_calls_the_unet_once_and_decodes(api, files):
    """FewStepStudentSample on a 1-step student: exactly one UNet forward, at sigma_max; an N-step
    recipe makes N. The latent decodes (random-weight SD1.5 VAE) to a finite, non-constant IMAGE."""
    import comfy.sd
    from comfyui_fewstep.distill_loaders.specs import get_recipe

    model, _, _, sampler, sigmas, _ = api.nodes.load_student_model(files / "dmd2_sd15_unet.safetensors")
    node = api.nodes.FewStepStudentSample
    assert node.define_schema().node_id == "FewStepStudentSample"
    calls = []

    def record(module, args, kwargs, out):  # UNetModel.forward(x, timesteps, context=..., ...)
        calls.append(float((kwargs["timesteps"] if "timesteps" in kwargs else args[1])[0]))

    hook = model.model.diffusion_model.register_forward_hook(record, with_kwargs=True)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(LATENT)}
    try:
        out = node.execute(model, sampler, sigmas, cond, cond, latent, 7, 1.0).result[0]
        assert calls == [pytest.approx(999, abs=1e-3)]  # the UNet sees DDPM timestep 999 once
        again = node.execute(model, sampler, sigmas, cond, cond, latent, 7, 1.0).result[0]
        calls.clear()
        four = get_recipe("dmd2_sdxl_4step")  # same eps UNet, DMD2's 4-step re-noising loop
        node.execute(
            model, api.nodes.student_sampler(four), recipe_sigmas(four).float(), cond, cond, latent, 7, 1.0
        )
        assert calls == pytest.approx([999, 749, 499, 249], abs=1e-3)
    finally:
        hook.remove()
    samples = out["samples"]
    assert samples.shape == LATENT and bool(torch.isfinite(samples).all())
    assert torch.equal(samples, again["samples"])  # seeded
    make = _make_test_models()
    vae = comfy.sd.VAE(sd=dict(make.random_state_dict(make.sd15_vae_shapes(), seed=1)))
    image = vae.decode(samples).detach()
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(image).all())
    assert float(image.std()) > 1e-3 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_unit_noise_only_from_an_empty_latent(api):
    """DMD2-SDXL-style recipes: from an empty latent the UNet input is unit-variance noise at the
    first sigma; an image latent (img2img, denoise < 1) is noised as ComfyUI does: latent + sigma z."""
    import comfy.supported_models
    from comfyui_fewstep.distill_loaders.specs import get_recipe

    cfg = comfy.supported_models.SD15({"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                                       "adm_in_channels": None, "use_temporal_attention": False})
    ms = api.nodes.student_model_sampling(get_recipe("dmd2_sdxl_1step"), cfg)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(4))
    image = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([ddpm_sigma(499)])
    empty = ms.noise_scaling(sigma, z, torch.zeros_like(z), False)
    torch.testing.assert_close(empty, z * math.sqrt(1.0 + float(sigma) ** 2), rtol=1e-5, atol=1e-5)
    img2img = ms.noise_scaling(sigma, z, image, False)
    torch.testing.assert_close(img2img, image + float(sigma) * z, rtol=1e-5, atol=1e-5)
    # a recipe without unit noise keeps sigma * z even where ComfyUI would pass max_denoise
    ddpm = api.nodes.student_model_sampling(get_recipe("sid_lsg_sd15_1step"), cfg)
    torch.testing.assert_close(ddpm.noise_scaling(sigma, z, torch.zeros_like(z), True), float(sigma) * z,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing_bias", "missing_attention_key", "wrong_shape"])
def test_incomplete_or_wrong_unet_files_are_refused(api, sd15_diffusers, tmp_path, damage):
    """Missing weights would stay uninitialised in ComfyUI's UNet (finite garbage), a wrong shape
    would build another model: both stop with the file named and what to do."""
    sd = dict(sd15_diffusers)
    if damage == "missing_bias":
        del sd["conv_out.bias"]
    elif damage == "missing_attention_key":
        del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    else:
        sd["conv_out.weight"] = torch.zeros(8, 320, 3, 3, dtype=torch.float16)
        sd["conv_out.bias"] = torch.zeros(8, dtype=torch.float16)
    path = tmp_path / "dmd2_sd15_unet.safetensors"
    save_file(sd, str(path))
    match = "wrong shape" if damage == "wrong_shape" else "weights are missing"
    with pytest.raises(StudentLoadError, match=f"dmd2_sd15_unet.safetensors: this is not a complete sd15 UNet.*{match}"):
        api.nodes.load_student_model(path)


def test_stream_refuses_a_parameter_the_file_does_not_fill(api, sd15_diffusers, tmp_path, monkeypatch):
    """Second line of defence: even past detection, no parameter keeps uninitialised memory."""
    sd = dict(sd15_diffusers)
    del sd["conv_out.bias"]
    path = tmp_path / "dmd2_sd15_unet.safetensors"
    save_file(sd, str(path))
    monkeypatch.setattr(api.nodes, "_check_unet_keys", lambda det: None)
    with pytest.raises(StudentLoadError, match="1 UNet weights are not in the file.*out.2.bias"):
        api.nodes.load_student_model(path)


def test_lcm_guidance_embedding_is_kept_under_its_ldm_name(api, sd15_diffusers, tmp_path):
    """Our converter writes the embedding as time_embed.cond_proj.weight: the file is detected as
    LCM from that key and the embedding is patched in (the other namings: test_students_detect)."""
    ldm, _ = K.convert_diffusers_to_ldm(sd15_diffusers, "sd15", prefix="model.diffusion_model.")
    w = torch.randn(1280, 256, generator=torch.Generator().manual_seed(6)).half() * 0.02
    ldm["model.diffusion_model.time_embed.cond_proj.weight"] = w
    path = tmp_path / "student_unet.safetensors"  # the name says nothing: the keys must
    save_file(ldm, str(path))
    model, *_, info = api.nodes.load_student_model(path)
    assert "recipe:      lcm" in info and "LCM guidance embedding" in info
    embed = model.get_model_object("diffusion_model.time_embed")
    assert type(embed).__name__ == "GuidedTimeEmbedding"
    torch.testing.assert_close(embed.cond_proj.weight.to(w.dtype), w)


def test_lora_text_encoder_modules_are_reported(api, files, tmp_path):
    base, *_ = api.nodes.load_student_model(files / "dmd2_sd15_unet.safetensors")
    g = torch.Generator().manual_seed(3)
    shapes = kohya_lora_shapes("sd15", 4)
    tensors = {k: (torch.randn(s, generator=g) * 0.01 if s else torch.tensor(4.0)) for k, s in shapes.items()}
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 4)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(tmp_path / "lcm-lora-sdv1-5.safetensors"))
    *_, info = api.nodes.load_student_model(tmp_path / "lcm-lora-sdv1-5.safetensors", model=base)
    assert "1 text-encoder modules not applied" in info


def test_loader_refuses_a_step_count_before_reading_weights(api, files, tmp_path, monkeypatch):
    """A steps value the recipe cannot run (or that contradicts custom timesteps) is a load error
    naming the file, raised before the weights (gigabytes for SDXL) are read."""
    def no_weights(*args, **kwargs):
        raise AssertionError("weights read before the steps were checked")

    monkeypatch.setattr(api.nodes, "_stream_unet", no_weights)
    monkeypatch.setattr(api.nodes, "load_weights", no_weights)
    path = files / "dmd2_sd15_unet.safetensors"
    with pytest.raises(StudentLoadError, match=r"dmd2_sd15_unet\.safetensors.*distilled for \[1\] steps, got 2.*"
                                               r"What to do: fix the loader's steps"):
        api.nodes.load_student(path, steps=2)
    with pytest.raises(StudentLoadError, match=r"steps must be 2, got 4.*steps 0 runs the recipe's own steps, "
                                               r"or the custom timesteps given"):
        api.nodes.load_student(path, "step_distilled_eps", steps=4, timesteps="999, 499")


def test_loader_takes_a_students_own_timesteps_eta_and_reports_cfg(api, files, tmp_path):
    """Step-distilled students with their own timesteps (SnapFusion-style, eps or v), a TCD gamma
    other than the recipe's, and the recipe's cfg as an output."""
    import comfy.model_sampling as ms

    (tmp_path / "student_unet.safetensors").symlink_to(files / "dmd2_sd15_unet.safetensors")  # a name that says nothing
    api.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    node = api.nodes.FewStepStudentLoader
    out = node.execute("diffusion_models/student_unet.safetensors", "step_distilled_v", 0,
                       timesteps="999, 874, 749, 624, 499, 374, 249, 124").result
    model, sampler, sigmas, info, cfg = out[0], out[1], out[2], out[5], out[6]
    assert sigmas.tolist()[:-1] == pytest.approx([ddpm_sigma(t) for t in (999, 874, 749, 624, 499, 374, 249, 124)],
                                                 rel=1e-6)
    assert isinstance(model.get_model_object("model_sampling"), ms.V_PREDICTION) and cfg == 1.0
    assert "custom timesteps: [999, 874, 749, 624, 499, 374, 249, 124]" in info
    x = _sample(api, model, sampler, sigmas)
    assert torch.isfinite(x).all()
    with pytest.raises(StudentLoadError, match="strictly decreasing.*What to do: fix the loader's steps / timesteps"):
        node.execute("diffusion_models/student_unet.safetensors", "step_distilled_eps", 0, timesteps="100, 500")
    base = api.nodes.load_student(files / "dmd2_sd15_unet.safetensors").model
    g = torch.Generator().manual_seed(2)
    shapes = kohya_lora_shapes("sd15", 4)
    save_file({k: (torch.randn(s, generator=g) * 0.01 if s else torch.tensor(4.0)) for k, s in shapes.items()},
              str(tmp_path / "pcm_sd15_normalcfg_8step_lora.safetensors"))
    pcm = api.nodes.load_student(tmp_path / "pcm_sd15_normalcfg_8step_lora.safetensors", "pcm_normalcfg_8step",
                                 model=base, tcd_eta=0.2)
    assert pcm.recipe.cfg == 7.5 and pcm.sampler.extra_options["eta"] == 0.2 and "TCD eta (gamma): 0.2" in pcm.info
    plain = api.nodes.load_student(files / "dmd2_sd15_unet.safetensors", tcd_eta=0.2)
    assert "tcd_eta ignored" in plain.info


def test_two_loaders_of_one_file_share_its_weights_while_either_output_lives(api, files):
    """One student at 1 and at 4 steps (two loader nodes) reads the file once; each output keeps
    its own recipe patches; once ComfyUI drops the outputs nothing is kept, and a changed file is
    read again."""
    import weakref

    path = files / "LCM_Dreamshaper_v7_unet.safetensors"
    one = api.nodes.load_student(path, "lcm", steps=1)
    four = api.nodes.load_student(path, "lcm", steps=4, lcm_guidance=4.0)
    assert four.model.model is one.model.model  # one copy of the weights
    assert "weights: shared with another loader of this file" in four.info and "shared" not in one.info
    assert len(one.sigmas) == 2 and len(four.sigmas) == 5
    patches = [m.object_patches["diffusion_model.time_embed"] for m in (one.model, four.model)]
    assert [p.guidance_scale for p in patches] == [8.5, 4.0]  # each output its own w-embedding patch
    first = weakref.ref(one.model.model)
    del one, four, patches
    gc.collect()
    assert first() is None and not api.nodes._SHARED  # nothing kept once the outputs are gone
    again = api.nodes.load_student(path, "lcm", steps=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed
    edited = api.nodes.load_student(path, "lcm", steps=1)
    assert edited.model.model is not again.model.model and "shared" not in edited.info
