"""Detection, key conversion and the inspect CLI on synthetic files with real key layouts."""

from __future__ import annotations

import json
import time

import pytest
import torch
from comfyui_fewstep.distill_loaders import keys as K
from comfyui_fewstep.distill_loaders.detect import detect
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.inspect import main as inspect_main
from comfyui_fewstep.distill_loaders.synthetic import (
    kohya_lora_shapes,
    peft_lora_shapes,
    processor_lora_shapes,
    unet_shapes,
    write_safetensors,
)

# --- key layouts -------------------------------------------------------------------------------


def test_key_counts_match_the_published_unets():
    # SD1.5 / SD2.1 UNet: 686 tensors (859.5M params); SDXL: 1680 tensors (2.567B params).
    for arch, count, params in (
        ("sd15", 686, 859_520_964),
        ("sd21", 686, 865_910_724),
        ("sdxl", 1680, 2_567_463_684),
    ):
        shapes = K.diffusers_unet_shapes(arch)
        assert len(shapes) == count
        assert sum(torch.Size(s).numel() for s in shapes.values()) == params


_DIFFUSERS_CONFIGS = {
    "sd15": dict(cross_attention_dim=768),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        attention_head_dim=[5, 10, 20],
    ),
}


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_diffusers_key_list_equals_diffusers_unet(arch):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**_DIFFUSERS_CONFIGS[arch])
    real = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert real == K.diffusers_unet_shapes(arch)


def test_ldm_names_follow_openaimodel_layout():
    m = K.diffusers_to_ldm_map("sd15")
    assert m["conv_in.weight"] == "input_blocks.0.0.weight"
    assert m["down_blocks.0.resnets.1.norm1.weight"] == "input_blocks.2.0.in_layers.0.weight"
    assert m["down_blocks.0.attentions.1.proj_in.weight"] == "input_blocks.2.1.proj_in.weight"
    assert m["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert m["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert m["down_blocks.3.resnets.1.conv2.bias"] == "input_blocks.11.0.out_layers.3.bias"
    assert (
        m["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
        == "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    )
    assert m["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert m["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert m["up_blocks.3.resnets.2.time_emb_proj.weight"] == "output_blocks.11.0.emb_layers.1.weight"
    assert m["conv_out.weight"] == "out.2.weight" and m["time_embedding.linear_2.bias"] == "time_embed.2.bias"
    x = K.diffusers_to_ldm_map("sdxl")
    assert x["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert (
        x["up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2.weight"]
        == "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight"
    )
    assert len(set(x.values())) == len(x)  # one-to-one


def test_conversion_is_zero_copy_and_round_trips():
    shapes = K.diffusers_unet_shapes("sd15")
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd["time_embedding.cond_proj.weight"] = torch.empty(320, 256, device="meta")
    sd["some.stray.key"] = torch.empty(1, device="meta")
    ldm, unexpected = K.convert_diffusers_to_ldm(sd, "sd15", prefix="model.diffusion_model.")
    assert unexpected == ["some.stray.key"]
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"] is sd["conv_in.weight"]
    assert ldm["model.diffusion_model.time_embed.cond_proj.weight"] is sd["time_embedding.cond_proj.weight"]
    back, unexpected = K.convert_ldm_to_diffusers(ldm, "sd15", prefix="model.diffusion_model.")
    assert unexpected == [] and set(back) == set(sd) - {"some.stray.key"}
    assert all(back[k] is sd[k] for k in back)


def test_ldm_map_agrees_with_comfyui(comfy):
    import comfy.utils

    cfg = dict(
        num_res_blocks=[2] * 3,
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
    )
    theirs = comfy.utils.unet_to_diffusers(cfg)
    ours = K.diffusers_to_ldm_map("sdxl")
    assert all(theirs[k] == v for k, v in ours.items())


# --- detection -------------------------------------------------------------------------------

CASES = [
    # file name, arch, layout builder, expected layout, expected recipe
    ("dmd2_sdxl_4step_unet_fp16.safetensors", "sdxl", "diffusers", "diffusers_unet", "dmd2_sdxl_4step"),
    ("dmd2_sdxl_1step_unet_fp16.safetensors", "sdxl", "diffusers", "diffusers_unet", "dmd2_sdxl_1step"),
    ("dmd2_sd15_pytorch_model.safetensors", "sd15", "diffusers", "diffusers_unet", "dmd2_sd15_1step"),
    ("sd_xl_turbo_1.0_fp16.safetensors", "sdxl", "ldm_checkpoint", "ldm_checkpoint", "sdxl_turbo_sdxl"),
    ("sd_turbo.safetensors", "sd21", "ldm_checkpoint", "ldm_checkpoint", "sd_turbo_sd21"),
    ("sdxl_lightning_4step.safetensors", "sdxl", "ldm_checkpoint", "ldm_checkpoint", "sdxl_lightning_4step"),
    ("sdxl_lightning_8step_unet.safetensors", "sdxl", "diffusers", "diffusers_unet", "sdxl_lightning_8step"),
    (
        "sdxl_lightning_1step_unet_x0.safetensors",
        "sdxl",
        "diffusers",
        "diffusers_unet",
        "sdxl_lightning_1step_x0",
    ),
    ("Hyper-SDXL-1step-Unet.safetensors", "sdxl", "diffusers", "diffusers_unet", "hyper_sdxl_1step_unet"),
    (
        "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors",
        "sdxl",
        "ldm_checkpoint",
        "ldm_checkpoint",
        "hyper_sdxl_1step_unet",
    ),
    (
        "batch512_cfg1.51.51.5_t625_8806_v2.safetensors",
        "sd15",
        "diffusers",
        "diffusers_unet",
        "sid_lsg_sd15_1step",
    ),
    (
        "batch512_sd21_cfg222_t625_8482_v2.safetensors",
        "sd21",
        "diffusers",
        "diffusers_unet",
        "sid_lsg_sd21_1step",
    ),
    ("scflow_unet_ema.safetensors", "sd15", "diffusers", "diffusers_unet", "scflow_sd15_1step"),
    ("instaflow_0_9B.safetensors", "sd15", "ldm_unet", "ldm_unet", "instaflow_sd15_1step"),
    ("swiftbrush_unet.safetensors", "sd21", "diffusers", "diffusers_unet", "swiftbrush_sd21_1step"),
]


@pytest.mark.parametrize("name, arch, builder, layout, recipe", CASES)
def test_detects_full_models(tmp_path, name, arch, builder, layout, recipe):
    path = write_safetensors(tmp_path / name, unet_shapes(arch, builder))
    det = detect(path)
    assert (det.layout, det.arch, det.recipe, det.confidence) == (layout, arch, recipe, "certain")
    assert det.missing == [] and det.unexpected == [] and det.mismatched == []
    assert any(r.startswith("arch ") for r in det.reasons) and any(
        r.startswith("recipe ") for r in det.reasons
    )


def test_dmd2_kohya_lora(tmp_path):
    path = write_safetensors(
        tmp_path / "dmd2_sdxl_4step_lora_fp16.safetensors", kohya_lora_shapes("sdxl", 64)
    )
    det = detect(path)
    assert (det.layout, det.arch, det.recipe, det.lora_rank) == ("lora_kohya", "sdxl", "dmd2_sdxl_4step", 64)


@pytest.mark.parametrize(
    "name, arch, recipe",
    [
        ("pytorch_lora_weights.safetensors", "sd15", None),
        ("lcm-lora-sdv1-5.safetensors", "sd15", "lcm_lora"),
        ("TCD-SDXL-LoRA.safetensors", "sdxl", "tcd_lora"),
        ("Hyper-SD15-4steps-lora.safetensors", "sd15", "hyper_4step_lora"),
        ("Hyper-SDXL-1step-lora.safetensors", "sdxl", "hyper_1step_lora_tcd"),
        ("Hyper-SDXL-8steps-CFG-lora.safetensors", "sdxl", "hyper_8step_cfg_lora"),
        ("Hyper-SD15-12steps-CFG-lora.safetensors", "sd15", "hyper_12step_cfg_lora"),
        ("pcm_sdxl_smallcfg_8step_converted.safetensors", "sdxl", "pcm_smallcfg_8step"),
        ("pcm_sd15_normalcfg_16step_converted.safetensors", "sd15", "pcm_normalcfg_16step"),
    ],
)
def test_diffusers_loras(tmp_path, name, arch, recipe):
    det = detect(write_safetensors(tmp_path / name, peft_lora_shapes(arch, 16)))
    assert (det.layout, det.arch, det.recipe, det.lora_rank) == ("lora_diffusers", arch, recipe, 16)
    assert det.confidence == ("none" if recipe is None else "certain")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_attention_processor_loras(tmp_path, arch):
    det = detect(write_safetensors(tmp_path / "lcm_lora.safetensors", processor_lora_shapes(arch, 8)))
    assert (det.layout, det.arch, det.recipe, det.lora_rank) == ("lora_diffusers", arch, "lcm_lora", 8)


def test_metadata_names_the_recipe(tmp_path):
    path = write_safetensors(
        tmp_path / "model.safetensors",
        unet_shapes("sdxl", "ldm_unet"),
        metadata={"fewstep_recipe": "dmd2_sdxl_1step"},
    )
    det = detect(path)
    assert det.recipe == "dmd2_sdxl_1step" and "metadata" in det.reasons[-1]


def test_a_renamed_conversion_keeps_the_name_of_its_pickle(tmp_path):
    """The converter records the pickle's name; after a rename it still identifies the student,
    and the file's own name still decides first."""
    meta = {"fewstep_converted_from": "batch512_cfg222_t625_4812_v2.pkl"}
    det = detect(write_safetensors(tmp_path / "sd15_onestep.safetensors", unet_shapes("sd15", "diffusers"),
                                   metadata=meta))
    assert (det.recipe, det.confidence, det.decided_by) == ("sid_lsg_sd15_1step", "certain", "metadata")
    assert "the name of the pickle it was converted from" in det.reasons[-1]
    det = detect(write_safetensors(tmp_path / "dmd2_sd15_1step.safetensors", unet_shapes("sd15", "diffusers"),
                                   metadata=meta))
    assert (det.recipe, det.decided_by) == ("dmd2_sd15_1step", "file name")


def test_metadata_recipe_for_another_architecture_is_refused(tmp_path):
    path = write_safetensors(
        tmp_path / "model.safetensors",
        unet_shapes("sd15", "diffusers"),
        metadata={"fewstep_recipe": "sdxl_lightning_4step"},
    )
    match = "names recipe 'sdxl_lightning_4step'.*but the file is a sd15 model"
    with pytest.raises(StudentLoadError, match=match):
        detect(path)
    det = detect(path, override="dmd2_sd15_1step")  # the override is the way out the message names
    assert det.recipe == "dmd2_sd15_1step"
    assert any("is not for a sd15 model; ignored" in r for r in det.reasons)
    unknown = write_safetensors(tmp_path / "m2.safetensors", unet_shapes("sd15", "diffusers"),
                                metadata={"fewstep_recipe": "some_future_recipe"})
    det = detect(unknown)
    assert det.recipe is None and any("not known to this version" in r for r in det.reasons)


@pytest.mark.parametrize("layout,name", [
    ("diffusers", "time_embedding.cond_proj.weight"),
    ("ldm_unet", "time_embed.cond_proj.weight"),  # as our converter writes it
    ("ldm_unet", "model.diffusion_model.time_embed.cond_proj.weight"),
    ("ldm_checkpoint", "model.diffusion_model.time_embed.cond_proj.weight"),
    ("ldm_checkpoint", "model.diffusion_model.time_embedding.cond_proj.weight"),
])
def test_lcm_guidance_embedding_is_recognised_under_every_name(tmp_path, layout, name):
    shapes = unet_shapes("sd15", layout)
    if name.startswith("model.") and not any(k.startswith("model.diffusion_model.") for k in shapes):
        shapes = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    det = detect(write_safetensors(tmp_path / "unet.safetensors", shapes | {name: (1280, 256)}))
    assert det.recipe == "lcm" and det.unexpected == [] and det.missing == []


def test_diffusers_folder_and_bin(tmp_path):
    folder = tmp_path / "LCM_Dreamshaper_v7" / "unet"
    folder.mkdir(parents=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", unet_shapes("sd15", "diffusers"))
    (folder / "config.json").write_text(json.dumps({"time_cond_proj_dim": 256}))
    det = detect(tmp_path / "LCM_Dreamshaper_v7")
    assert det.layout == "diffusers_unet" and det.recipe == "lcm" and det.confidence == "certain"
    small = {k: torch.zeros(1) for k in ("conv_in.weight",)}
    torch.save(small, tmp_path / "x.bin")
    with pytest.raises(StudentLoadError, match="unknown UNet architecture"):
        detect(tmp_path / "x.bin")


def test_bin_state_dict_is_read_weights_only(tmp_path):
    shapes = unet_shapes("sd15", "diffusers")
    one = torch.zeros(1, dtype=torch.float16)
    sd = {k: one.expand(s) for k, s in shapes.items()}  # real shapes, one element of storage
    torch.save(sd, tmp_path / "dmd2_sd15_unet.bin")
    det = detect(tmp_path / "dmd2_sd15_unet.bin")
    assert det.container == "torch" and det.recipe == "dmd2_sd15_1step" and det.missing == []
    assert det.parameters == 859_520_964 and det.dtypes == {"float16": 686}


def test_missing_and_mismatched_keys_are_reported(tmp_path):
    shapes = unet_shapes("sd15", "diffusers")
    del shapes["conv_out.bias"]
    shapes["conv_out.weight"] = (8, 320, 3, 3)
    det = detect(write_safetensors(tmp_path / "dmd2_sd15.safetensors", shapes))
    assert det.missing == ["conv_out.bias"]
    assert det.mismatched == ["conv_out.weight: [8, 320, 3, 3] (expected [4, 320, 3, 3])"]


def test_override(tmp_path):
    path = write_safetensors(tmp_path / "unet.safetensors", unet_shapes("sdxl", "diffusers"))
    det = detect(path)
    assert det.recipe is None and det.confidence == "none"
    det = detect(path, override="dmd2_sdxl_1step")
    assert det.recipe == "dmd2_sdxl_1step" and det.reasons[-1] == "override: dmd2_sdxl_1step"
    with pytest.raises(StudentLoadError, match="for sd21 but the file is a sdxl model.*What to do"):
        detect(path, override="sd_turbo_sd21")
    named = write_safetensors(
        tmp_path / "sdxl_lightning_4step_unet.safetensors", unet_shapes("sdxl", "diffusers")
    )
    with pytest.raises(StudentLoadError, match="expects x0 prediction.*sdxl_lightning_4step"):
        detect(named, override="sdxl_lightning_1step_x0")
    assert (
        detect(named, override="dmd2_sdxl_4step")
        .reasons[-1]
        .endswith("replaces the detected sdxl_lightning_4step")
    )


def test_override_wins_over_a_folder_or_metadata_name(tmp_path):
    """Only the file's own name refuses an override of another prediction type: a folder called
    'lcm', or a recipe recorded by an earlier conversion, can be wrong for the file, and the
    override is the only way to say so (renaming the file would not change them)."""
    folder = tmp_path / "lcm"
    folder.mkdir()
    path = write_safetensors(folder / "juggernaut_unet.safetensors", unet_shapes("sdxl", "diffusers"))
    det = detect(path)
    assert det.recipe == "lcm" and det.decided_by == "folder name"
    assert det.reasons[-1] == "recipe lcm: folder name says LCM ('lcm')"
    det = detect(path, override="sdxl_lightning_4step")
    assert det.recipe == "sdxl_lightning_4step" and det.confidence == "certain"
    assert "contradicts lcm (lcm prediction), named by the folder name" in " ".join(det.reasons)
    tagged = write_safetensors(tmp_path / "unet.safetensors", unet_shapes("sdxl", "diffusers"),
                               metadata={"fewstep_recipe": "sdxl_lightning_4step"})
    assert detect(tagged).decided_by == "metadata"
    assert detect(tagged, override="sdxl_lightning_1step_x0").recipe == "sdxl_lightning_1step_x0"
    named = write_safetensors(folder / "sdxl_lightning_4step_unet.safetensors",
                              unet_shapes("sdxl", "diffusers"))
    assert detect(named).decided_by == "file name"
    with pytest.raises(StudentLoadError, match="rename the file"):
        detect(named, override="sdxl_lightning_1step_x0")


def test_header_only_read_is_fast_on_a_full_size_file(tmp_path):
    path = write_safetensors(
        tmp_path / "sd_xl_turbo_1.0.safetensors", unet_shapes("sdxl", "ldm_checkpoint"), dtype="F32"
    )
    assert path.stat().st_size > 10e9 - 1  # 2.57B fp32 parameters, sparse on disk
    start = time.perf_counter()
    det = detect(path)
    assert time.perf_counter() - start < 1.0
    assert det.parameters > 2_567_463_684


# --- the CLI ---------------------------------------------------------------------------------


def test_inspect_cli(tmp_path, capsys):
    path = write_safetensors(
        tmp_path / "dmd2_sdxl_1step_unet_fp16.safetensors", unet_shapes("sdxl", "diffusers")
    )
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "recipe:      dmd2_sdxl_1step: eps prediction, 1 step(s)" in out
    assert "timesteps:   [399]" in out and "sigmas:      [1.1606, 0.0000]" in out
    assert "parameters:  2,567,463,684" in out
    assert inspect_main([str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "sdxl" and data["prediction"] == "eps" and data["student"] == "DMD2"
    assert data["missing"] == [] and data["layout"] == "diffusers_unet"
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x01\x00")
    assert inspect_main([str(bad)]) == 1
    assert "too short to be safetensors" in capsys.readouterr().err


def test_cli_dispatch(tmp_path, capsys):
    from comfyui_fewstep.cli import main

    path = write_safetensors(tmp_path / "sd_turbo.safetensors", unet_shapes("sd21", "ldm_checkpoint"))
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "sd_turbo_sd21"


def test_lora_keys_to_kohya_zero_copy():
    t = torch.zeros(1)
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": t,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": t,
        "base_model.model.mid_block.resnets.0.conv1.lora_A.default.weight": t,
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": t,
        "down_blocks.1.attentions.0.proj_in.lora.up.weight": t,
        "unet.conv_in.alpha": t,
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": t,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": t,
    }
    out, n = K.lora_to_kohya(sd)
    assert n == 6 and all(v is t for v in out.values())
    assert sorted(out) == sorted(
        [
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
            "lora_unet_mid_block_resnets_0_conv1.lora_down.weight",
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight",
            "lora_unet_conv_in.alpha",
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        ]
    )


def test_inspect_never_imports_torch(tmp_path):
    """``inspect`` reads the header only: in a fresh interpreter it answers without importing torch
    (which alone takes seconds to import)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = write_safetensors(tmp_path / "dmd2_sdxl_1step_unet_fp16.safetensors", unet_shapes("sdxl", "diffusers"))
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_fewstep', {str(root / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(root)!r}])\n"
        "pkg = importlib.util.module_from_spec(spec); sys.modules['comfyui_fewstep'] = pkg; spec.loader.exec_module(pkg)\n"
        "from comfyui_fewstep.cli import main\n"
        f"rc = main(['inspect', {str(path)!r}, '--json'])\n"
        "print('TORCH', 'torch' in sys.modules, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    data = json.loads(out[: out.rindex("TORCH")])
    assert data["recipe"] == "dmd2_sdxl_1step" and data["arch"] == "sdxl"
    assert out.strip().endswith("TORCH False 0")


def test_recipe_sigma_table_equals_the_torch_schedule():
    from comfyui_fewstep.distill_loaders.recipes import _sigmas
    from comfyui_fewstep.samplers.parameterization import discrete_vp_sigmas

    torch.testing.assert_close(torch.tensor(_sigmas(), dtype=torch.float64), discrete_vp_sigmas(1000),
                               rtol=1e-14, atol=0.0)
