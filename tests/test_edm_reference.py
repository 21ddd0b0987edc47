"""EDM networks against the reference implementation (NVlabs/edm ``training/networks.py``).

* ``data/edm_reference_state_dicts.json`` holds the ordered ``state_dict()`` names and shapes, and the
  parameter counts, of the reference networks built with the configurations EDM publishes and SiD
  distils (EDM ``train.py`` presets and README commands): CIFAR-10 32x32 DDPM++ (unconditional and
  class-conditional, ``augment_dim=9``), FFHQ / AFHQv2 64x64 DDPM++ (``channel_mult=[1,2,2,2]``) and
  ImageNet 64x64 ADM. Names and shapes are data recorded from the reference, not code.
* The fused up-sampling convolution is checked against a transcription of the reference formula.
* A snapshot pickled the way EDM/SiD save one (``{'ema': EDMPrecond}``, every module written by
  ``torch_utils.persistence`` with its source, ``skip_scale`` a numpy scalar) converts and runs.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_fewstep.distill_loaders.convert_pickle import convert
from comfyui_fewstep.distill_loaders.detect import detect
from comfyui_fewstep.distill_loaders.edm_networks import (
    Conv2d,
    UNetBlock,
    build_edm_network,
    edm_config_from_state_dict,
    generate_one_step,
)
from comfyui_fewstep.distill_loaders.load import load_weights
from torch.nn.functional import conv2d, conv_transpose2d, silu

REFERENCE = json.loads((Path(__file__).parent / "data" / "edm_reference_state_dicts.json").read_text())

_DDPMPP = {"model_channels": 128, "augment_dim": 9}
PUBLISHED = {  # the constructor arguments of the reference runs above, for our networks
    "cifar10-32x32-uncond-ddpmpp": ("SongUNet", dict(_DDPMPP, img_resolution=32, channel_mult=[2, 2, 2])),
    "cifar10-32x32-cond-ddpmpp": (
        "SongUNet",
        dict(_DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], label_dim=10),
    ),
    "ffhq-afhqv2-64x64-uncond-ddpmpp": (
        "SongUNet",
        dict(_DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2]),
    ),
    "imagenet-64x64-cond-adm": (
        "DhariwalUNet",
        {"img_resolution": 64, "label_dim": 1000, "model_channels": 192, "channel_mult": [1, 2, 3, 4]},
    ),
}


def _listing(sd) -> list[str]:
    return [f"{k} {'x'.join(map(str, v.shape))}" for k, v in sd.items()]


def test_every_reference_config_is_covered():
    assert sorted(PUBLISHED) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_state_dict_names_shapes_and_size_equal_the_reference(name):
    arch, kwargs = PUBLISHED[name]
    ref = REFERENCE[name]
    assert ref["network"] == arch
    with torch.device("meta"):
        net = build_edm_network(arch, in_channels=3, out_channels=3, **kwargs)
    assert _listing(net.state_dict()) == ref["state_dict"]  # same names, shapes and order
    assert sum(p.numel() for p in net.parameters()) == ref["parameters"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_read_from_the_reference_state_dict_rebuilds_it(name):
    ref = REFERENCE[name]
    sd = {}
    for line in ref["state_dict"]:
        key, shape = line.split(" ")
        sd[key] = torch.empty([int(n) for n in shape.split("x")], device="meta")
    arch, kwargs = edm_config_from_state_dict(sd)
    assert arch == {"SongUNet": "edm_songunet", "DhariwalUNet": "edm_dhariwal"}[ref["network"]]
    for key, value in PUBLISHED[name][1].items():
        assert kwargs[key] == value, key
    with torch.device("meta"):
        assert _listing(build_edm_network(arch, **kwargs).state_dict()) == ref["state_dict"]


def test_ncsnpp_residual_encoder_is_refused_with_a_clear_error():
    with torch.device("meta"):
        kwargs = PUBLISHED["cifar10-32x32-uncond-ddpmpp"][1]
        sd = build_edm_network("SongUNet", in_channels=3, out_channels=3, **kwargs).state_dict()
    sd["enc.16x16_aux_residual.weight"] = torch.empty(256, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match="residual"):
        edm_config_from_state_dict(sd)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_fused_upsampling_convolution_follows_the_reference_formula(taps):
    """EDM ``Conv2d(fused_resample=True, up=True)``: transposed FIR up-sampling with padding
    ``max(f_pad - w_pad, 0)`` followed by the convolution with padding ``max(w_pad - f_pad, 0)``."""
    g = torch.Generator().manual_seed(0)
    conv = Conv2d(4, 6, 3, up=True, resample_filter=taps, fused=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    f = torch.tensor(taps, dtype=torch.float64)
    f = torch.outer(f, f)[None, None] / f.sum() ** 2
    w = conv.weight.double()
    w_pad, f_pad = 1, (len(taps) - 1) // 2
    y = conv_transpose2d(x, 4 * f.repeat(4, 1, 1, 1), groups=4, stride=2, padding=max(f_pad - w_pad, 0))
    y = conv2d(y, w, padding=max(w_pad - f_pad, 0)) + conv.bias.double().view(1, -1, 1, 1)
    out = conv(x)
    assert out.shape == (2, 6, 16, 16)
    torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)
    if taps == (1, 1):  # with a 2-tap filter fusing changes nothing
        plain = Conv2d(4, 6, 3, up=True, resample_filter=taps)
        plain.load_state_dict(conv.state_dict())
        torch.testing.assert_close(plain(x), out, rtol=1e-12, atol=1e-12)


def _reference_block(b: UNetBlock, x, emb):
    """Transcription of EDM ``UNetBlock.forward`` (the reference's operation order, which fixes the
    float32 rounding), composed from our verified layers."""
    orig = x
    x = b.conv0(silu(b.norm0(x)))
    params = b.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
    if b.adaptive_scale:
        scale, shift = params.chunk(chunks=2, dim=1)
        x = silu(torch.addcmul(shift, b.norm1(x), scale + 1))
    else:
        x = silu(b.norm1(x + params))
    x = b.conv1(x)
    x = (x + (b.skip(orig) if b.skip is not None else orig)) * b.skip_scale
    if b.num_heads:
        n, c = x.shape[:2]
        q, k, v = b.qkv(b.norm2(x)).reshape(n * b.num_heads, c // b.num_heads, 3, -1).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q.float(), (k / np.sqrt(k.shape[1])).float()).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w.to(q.dtype), v)
        x = (b.proj(a.reshape(*x.shape)) + x) * b.skip_scale
    return x


@pytest.mark.parametrize("arch", ["SongUNet", "DhariwalUNet"])
def test_unet_blocks_round_like_the_reference(arch):
    """Every block of a small network gives bit-identical float32 output to the transcription."""
    g = torch.Generator().manual_seed(3)
    net = build_edm_network(
        arch,
        img_resolution=16,
        in_channels=3,
        out_channels=3,
        model_channels=64,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.ndim > 1 else 16))
    emb = torch.randn(2, net.map_layer1.in_features, generator=g)
    blocks = [b for b in net.modules() if isinstance(b, UNetBlock)]
    assert any(b.num_heads for b in blocks) and any(b.skip is not None for b in blocks)
    assert all(b.adaptive_scale == (arch == "DhariwalUNet") for b in blocks)
    with torch.no_grad():
        for b in blocks:
            x = torch.randn(2, b.in_channels, 8, 8, generator=g)
            torch.testing.assert_close(b(x, emb), _reference_block(b, x, emb), rtol=0, atol=0)


class EDMPrecond(torch.nn.Module):
    """Stand-in with the reference wrapper's attributes; only its pickled form matters here."""

    def __init__(self, model, label_dim):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 16, 3, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = False, 0, float("inf"), 0.5
        self.model = model


def _persistence_pickle(obj, monkeypatch) -> bytes:
    """Pickle like EDM's ``torch_utils.persistence``: every module becomes
    ``_reconstruct_persistent_obj({'type': 'class', 'version', 'module_src', 'class_name', 'state'})``."""

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the converter must never call the pickled reconstructor")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module = types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

    class PersistencePickler(pickle.Pickler):
        def reducer_override(self, o):
            if not isinstance(o, torch.nn.Module):
                return NotImplemented
            meta = {
                "type": "class",
                "version": 6,
                "module_src": "import torch\n# training/networks.py\n",
                "class_name": type(o).__name__,
                "state": dict(o.__dict__),
            }
            return _reconstruct_persistent_obj, (meta,)

    buf = io.BytesIO()
    PersistencePickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def test_sid_snapshot_pickle_converts_and_generates_the_same_images(tmp_path, monkeypatch):
    torch.manual_seed(0)
    kwargs = {
        "img_resolution": 16,
        "in_channels": 3,
        "out_channels": 3,
        "label_dim": 10,
        "augment_dim": 9,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
    }
    net = build_edm_network("SongUNet", **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 25))
    for block in net.modules():
        if isinstance(block, UNetBlock):
            block.skip_scale = np.sqrt(0.5)  # the reference stores a numpy float64
    snapshot = {"ema": EDMPrecond(net, 10), "dataset_kwargs": {"class_name": "training.dataset.X"}}
    src = tmp_path / "network-snapshot-000000.pkl"
    src.write_bytes(_persistence_pickle(snapshot, monkeypatch))
    assert b"numpy" in src.read_bytes() and b"_reconstruct_persistent_obj" in src.read_bytes()

    dst, cfg = convert(src, tmp_path / "generator.safetensors")
    sd = load_weights(dst)
    arch, found = edm_config_from_state_dict(sd)
    loaded = build_edm_network(arch, **found).eval()
    loaded.load_state_dict(sd, strict=True)
    z = torch.randn(3, 3, 16, 16)
    labels = torch.eye(10)[[1, 5, 9]]
    torch.testing.assert_close(
        generate_one_step(loaded, z, 2.5, labels), generate_one_step(net, z, 2.5, labels), rtol=0, atol=0
    )
    assert (detect(dst).layout, detect(dst).recipe) == ("edm", "sid_edm_1step")
    modules = json.loads(cfg.read_text())["modules"]
    assert modules["<root>"]["class"].endswith("EDMPrecond")


def test_sid_imagenet_pickle_is_told_from_dmd2_by_its_provenance(tmp_path, monkeypatch, tiny_edm):
    """SiD's ImageNet-64 generator and DMD2's share the DhariwalUNet layout; a converted EDM
    persistence pickle (SiD's format) gets SiD's recipe whatever the file is called."""
    net = tiny_edm("DhariwalUNet")
    src = tmp_path / "network-snapshot-1.200000-939176.pkl"
    src.write_bytes(_persistence_pickle({"ema": EDMPrecond(net, 10)}, monkeypatch))
    dst, _ = convert(src, tmp_path / "generator.safetensors")
    det = detect(dst)
    assert (det.arch, det.recipe, det.confidence) == ("edm_dhariwal", "sid_edm_1step", "likely")
    assert any("pickled EDMPrecond module" in r for r in det.reasons), det.reasons
