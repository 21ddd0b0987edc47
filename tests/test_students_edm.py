"""EDM pixel generators: architecture size against the EDM paper, preconditioning, one-step generation,
and a converted pickle loading strictly into our network."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from comfyui_fewstep.distill_loaders.convert_pickle import convert
from comfyui_fewstep.distill_loaders.detect import detect
from comfyui_fewstep.distill_loaders.edm_networks import build_edm_network, edm_denoise, generate_one_step
from comfyui_fewstep.distill_loaders.recipes import recipe_sigmas
from safetensors.torch import load_file, save_file

CIFAR = dict(
    img_resolution=32,
    in_channels=3,
    out_channels=3,
    augment_dim=9,
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
)
IMAGENET = dict(
    img_resolution=64,
    in_channels=3,
    out_channels=3,
    label_dim=1000,
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
)


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_match_the_edm_paper():
    # EDM (Karras et al. 2022) Table 7: DDPM++ CIFAR-10 55.73M, ADM ImageNet-64 295.90M.
    with torch.device("meta"):
        assert round(_params(build_edm_network("SongUNet", **CIFAR)) / 1e6, 2) == 55.73
        assert round(_params(build_edm_network("DhariwalUNet", **IMAGENET)) / 1e6, 2) == 295.90


class _Zero(torch.nn.Module):
    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.std().item(), noise_labels.clone())
        return torch.zeros_like(x)


def test_preconditioning_closed_form():
    net = _Zero()
    z = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sigma = 2.5
    out = edm_denoise(net, sigma * z, sigma)
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(out, c_skip * sigma * z)
    std, c_noise = net.seen
    assert std == pytest.approx(sigma / math.sqrt(sigma**2 + 0.25), rel=0.01)  # c_in * sigma z
    torch.testing.assert_close(c_noise, torch.full((4,), math.log(2.5) / 4))


def test_one_step_generation_shapes_and_range(tiny_edm):
    net = tiny_edm("SongUNet")
    sigma_init = float(recipe_sigmas("sid_edm_1step")[0])
    assert sigma_init == 2.5
    x = generate_one_step(net, torch.randn(2, 3, 16, 16), sigma_init, torch.eye(10)[:2])
    assert x.shape == (2, 3, 16, 16) and bool(torch.isfinite(x).all()) and x.abs().max() <= 1
    # different labels give different images
    y = generate_one_step(net, torch.zeros(1, 3, 16, 16), sigma_init, torch.eye(10)[3:4])
    z = generate_one_step(net, torch.zeros(1, 3, 16, 16), sigma_init, torch.eye(10)[4:5])
    assert not torch.allclose(y, z)


def test_converted_pickle_loads_strictly(tmp_path, tiny_edm):
    net = tiny_edm("DhariwalUNet", seed=1)
    # DMD2's ImageNet pytorch_model.bin layout: an EDMPrecond state dict, network under "model."
    src = tmp_path / "dmd2-imagenet-network-snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": {f"model.{k}": v for k, v in net.state_dict().items()}}))
    dst, _ = convert(src, tmp_path / "dmd2_imagenet.safetensors")
    sd = load_file(str(dst))
    fresh = tiny_edm("DhariwalUNet", seed=2)
    fresh.load_state_dict(sd, strict=True)
    z = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        generate_one_step(fresh, z, 80.0, torch.eye(10)[:2]),
        generate_one_step(net, z, 80.0, torch.eye(10)[:2]),
    )
    det = detect(dst)
    assert (det.layout, det.arch, det.recipe) == ("edm", "edm_dhariwal", "dmd2_imagenet_1step")


@pytest.mark.parametrize(
    "arch, kwargs", [("SongUNet", CIFAR), ("SongUNet", dict(CIFAR, label_dim=10)), ("DhariwalUNet", IMAGENET)]
)
def test_config_is_recovered_from_shapes(arch, kwargs):
    from comfyui_fewstep.distill_loaders.edm_networks import edm_config_from_state_dict

    with torch.device("meta"):
        sd = build_edm_network(arch, **kwargs).state_dict()
        name, found = edm_config_from_state_dict(sd)
        rebuilt = build_edm_network(name, **found).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}
    assert found["attn_resolutions"] == list(kwargs["attn_resolutions"])


def _write(path, sd):
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    "arch, name, wrapped, recipe, confidence",
    [
        # DMD2 publishes its ImageNet-64 generator as a plain EDMPrecond state dict (names under model.)
        ("DhariwalUNet", "pytorch_model.bin", True, "dmd2_imagenet_1step", "likely"),
        ("DhariwalUNet", "generator.safetensors", True, "dmd2_imagenet_1step", "likely"),
        # a bare network with no provenance: SiD assumed, and the reasons say how to override
        ("DhariwalUNet", "generator.safetensors", False, "sid_edm_1step", "likely"),
        ("DhariwalUNet", "sid_imagenet64.safetensors", False, "sid_edm_1step", "certain"),
        ("DhariwalUNet", "my-dmd2-in64.safetensors", False, "dmd2_imagenet_1step", "certain"),
        # DMD2 has no SongUNet generator, whatever the file is called
        ("SongUNet", "dmd2_cifar.safetensors", True, "sid_edm_1step", "certain"),
    ],
)
def test_edm_recipe_from_provenance_not_only_the_name(tmp_path, tiny_edm, arch, name, wrapped, recipe, confidence):
    from comfyui_fewstep.distill_loaders.edm_networks import edm_config_from_state_dict, strip_precond_prefix
    from comfyui_fewstep.distill_loaders.load import load_weights

    net = tiny_edm(arch, seed=2)
    sd = {(f"model.{k}" if wrapped else k): v for k, v in net.state_dict().items()}
    path = _write(tmp_path / name, sd)
    det = detect(path)
    assert (det.layout, det.recipe, det.confidence) == ("edm", recipe, confidence), det.reasons
    if confidence == "likely":
        other = {"sid_edm_1step": "dmd2_imagenet_1step", "dmd2_imagenet_1step": "sid_edm_1step"}[recipe]
        sigma = {"sid_edm_1step": "2.5", "dmd2_imagenet_1step": "80"}[other]
        # the EDM generator node has no recipe input: the advice names the input it has
        advice = f"({other}), set the EDM generator's sigma_init to {sigma}"
        assert any(advice in r for r in det.reasons), det.reasons
    # the file loads strictly into the network read from its shapes, EDMPrecond wrapper or not
    weights = strip_precond_prefix(load_weights(path))
    found_arch, kwargs = edm_config_from_state_dict(weights)
    arch_name = {"edm_dhariwal": "DhariwalUNet", "edm_songunet": "SongUNet"}[found_arch]
    fresh = build_edm_network(arch_name, **kwargs)
    fresh.load_state_dict(weights, strict=True)
    z = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        generate_one_step(fresh, z, 2.5, torch.eye(10)[:2]), generate_one_step(net, z, 2.5, torch.eye(10)[:2])
    )


def test_converted_plain_state_dict_is_dmd2_and_recipe_flag_wins(tmp_path, tiny_edm):
    from comfyui_fewstep.distill_loaders.convert_pickle import main

    net = tiny_edm("DhariwalUNet", seed=2)
    src = tmp_path / "snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": {f"model.{k}": v for k, v in net.state_dict().items()}}))
    dst, _ = convert(src, tmp_path / "g.safetensors")
    det = detect(dst)
    assert (det.recipe, det.confidence) == ("dmd2_imagenet_1step", "likely")
    assert "plain state dict" in det.reasons[-2]
    # --recipe stores the choice in the file; detection then takes it as certain
    assert main([str(src), "-o", str(tmp_path / "h.safetensors"), "--recipe", "sid_edm_1step"]) == 0
    det = detect(tmp_path / "h.safetensors")
    assert (det.recipe, det.confidence) == ("sid_edm_1step", "certain")
    assert "fewstep_recipe" in det.reasons[-1]


def test_converter_refuses_a_recipe_for_another_network(tmp_path, capsys, tiny_edm):
    from comfyui_fewstep.distill_loaders.convert_pickle import main

    src = tmp_path / "snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": dict(tiny_edm("SongUNet").state_dict())}))
    dst = tmp_path / "g.safetensors"
    assert main([str(src), "-o", str(dst), "--recipe", "dmd2_imagenet_1step"]) == 1
    assert "is for edm_dhariwal, but the file is a edm_songunet model" in capsys.readouterr().err
    assert not dst.exists()  # no mislabelled file is left behind
    assert main([str(src), "-o", str(dst), "--recipe", "sid_edm_1step"]) == 0 and dst.exists()


def test_converter_refuses_an_unknown_recipe(tmp_path, capsys, tiny_edm):
    from comfyui_fewstep.distill_loaders.convert_pickle import main

    src = tmp_path / "snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": dict(tiny_edm("SongUNet").state_dict())}))
    assert main([str(src), "--recipe", "sid_edm"]) == 1
    err = capsys.readouterr().err
    assert "unknown recipe 'sid_edm'" in err and "sid_edm_1step" in err
    assert not (tmp_path / "snapshot.safetensors").exists()
