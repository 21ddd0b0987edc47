"""Bad input: every failure is a StudentLoadError naming the file and what to do."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from comfyui_fewstep.distill_loaders.detect import detect
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.safetensors_header import is_torch_save_file
from comfyui_fewstep.distill_loaders.load import (check_finite, check_lora_base, load_student, load_weights,
                                                  to_ldm_unet)
from comfyui_fewstep.distill_loaders.synthetic import kohya_lora_shapes, unet_shapes, write_safetensors


def _raises(path, match, **kw):
    with pytest.raises(StudentLoadError, match=match) as info:
        detect(path, **kw)
    err = info.value
    assert isinstance(err, ValueError) and err.path and os.path.basename(err.path) in str(err)
    assert "What to do:" in str(err)
    return err


def test_truncated_safetensors(tmp_path):
    path = write_safetensors(tmp_path / "dmd2.safetensors", unet_shapes("sd15", "diffusers"))
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    _raises(path, "truncated")
    os.truncate(path, 100)
    _raises(path, "header claims")


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    _raises(path, "not valid JSON")
    path.write_bytes(
        struct.pack("<Q", 70) + b'{"a": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 8]}}'.ljust(70)
    )
    _raises(path, "has 8 bytes for shape \\[4, 4\\] F16")
    path.write_bytes(
        struct.pack("<Q", 70) + b'{"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [-8, 0]}}'.ljust(70)
    )
    _raises(path, "byte range \\[-8, 0\\), outside the file's data")
    for metadata in (b'"a string"', b'["a", "list"]', b"42"):
        entry = b'"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}'
        header = b'{"__metadata__": ' + metadata + b", " + entry + b"}"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        _raises(path, "__metadata__ is a JSON (str|list|int), not an object")


def test_pickle_where_safetensors_expected(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"conv_in.weight": torch.zeros(2)}, path)
    _raises(path, "named .safetensors but is a torch zip archive")
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _raises(path, "is a torch pickle")


def test_pkl_is_never_opened(tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(b"\x80\x04this would be unpickled")
    err = _raises(path, "Python pickle")
    assert "comfyui_fewstep convert" in str(err)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_with_code_is_refused(tmp_path):
    path = tmp_path / "unet.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Evil()}, path)
    _raises(path, "pickle that needs code")


def test_bin_with_code_is_refused_in_the_legacy_format_too(tmp_path):
    path = tmp_path / "unet.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Evil()}, path, _use_new_zipfile_serialization=False)
    err = _raises(path, "needs code to load \\(Trying to load unsupported GLOBAL (posix|nt).system "
                        "whose module (posix|nt) is blocked\\); it was not run")
    assert "\x1b" not in str(err)  # torch's terminal colour codes are not passed on


def test_plain_pickle_under_a_torch_name_is_sent_to_the_converter(tmp_path):
    """A complete plain pickle (not torch.save) named .bin/.pt, e.g. a renamed network snapshot:
    'convert it', not 'truncated, download it again'; torch.save files of any pickle protocol load."""
    plain = tmp_path / "snapshot.pt"
    plain.write_bytes(pickle.dumps({"w": torch.ones(2)}))
    err = _raises(plain, "plain Python pickle, not a torch.save state dict")
    assert "python -m comfyui_fewstep convert" in str(err)
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights(legacy)["w"], torch.ones(2))
    framed = tmp_path / "legacy4.bin"  # protocol 4 frames the magic number: still torch.save's
    torch.save({"w": torch.ones(2)}, framed, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert is_torch_save_file(framed) and not is_torch_save_file(plain)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_truncated_torch_file_at_every_length(tmp_path, legacy):
    """A torch file cut anywhere is a truncated or corrupt file, never a raw exception, and never
    a pickle "that needs code" (a legacy file cut inside a global's name looks like one to torch)."""
    full = tmp_path / "full.bin"
    torch.save({"conv_in.weight": torch.zeros(320, 4, 3, 3), "conv_in.bias": torch.zeros(320)}, full,
               _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    path = tmp_path / "unet.bin"
    for cut in [*range(1, 400, 3), *range(400, len(data), 401)]:
        path.write_bytes(data[:cut])
        err = _raises(path, "truncat|corrupt|not a torch|not safetensors|zip")
        assert "needs code" not in str(err), cut


def test_unknown_architecture(tmp_path):
    _raises(
        write_safetensors(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": (128, 3, 3, 3)}),
        "unknown architecture",
    )
    shapes = unet_shapes("sd15", "diffusers")
    shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = (320, 512)
    shapes = {
        k: v
        for k, v in shapes.items()
        if "attn2.to_k" not in k or k.startswith("down_blocks.0.attentions.0.")
    }
    _raises(
        write_safetensors(tmp_path / "odd.safetensors", shapes),
        "unknown UNet architecture.*cross-attention width 512",
    )


def test_nan_weights(tmp_path):
    sd = {
        "conv_in.weight": torch.zeros(4, 4, dtype=torch.float16),
        "conv_in.bias": torch.zeros(4),
        "steps": torch.arange(3),
        "conv_out.weight": torch.zeros(2, dtype=torch.bfloat16),
    }
    check_finite(sd, "x.safetensors")
    sd["conv_in.bias"][1] = float("nan")
    sd["conv_out.weight"][0] = float("-inf")
    with pytest.raises(
        StudentLoadError, match="2 weight tensor\\(s\\) contain NaN or Inf: conv_in.bias, conv_out.weight"
    ):
        check_finite(sd, "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_nan_check_of_float8_weights(tmp_path, dtype):
    """float8 files (LoRAs, full checkpoints) are checked bit by bit: torch has no min/max for them."""
    sd = {"lora.down.weight": torch.linspace(-2, 2, 64).to(dtype), "lora.up.weight": torch.zeros(8).to(dtype)}
    check_finite(sd, "x.safetensors")
    for value in ("nan", "-nan") + (("inf", "-inf") if dtype == torch.float8_e5m2 else ()):
        bad = dict(sd, **{"lora.up.weight": sd["lora.up.weight"].clone()})
        bad["lora.up.weight"][5] = float(value.replace("-nan", "nan")) * (-1 if value == "-nan" else 1)
        match = "1 weight tensor\\(s\\) contain NaN or Inf: lora.up.weight"
        with pytest.raises(StudentLoadError, match=match):
            check_finite(bad, "x.safetensors")
    path = tmp_path / "Hyper-SD15-8steps-lora.safetensors"
    save_file({k: torch.zeros(v).to(dtype) for k, v in kohya_lora_shapes("sd15", rank=4).items()}, str(path))
    det, lora = load_student(path)  # the whole LoRA path: read, detect, check
    assert det.recipe is not None and all(t.dtype == dtype for t in lora.values())


def test_load_student_checks_and_converts_zero_copy(tmp_path):
    shapes = unet_shapes("sd15", "diffusers")
    bad = torch.zeros(320, dtype=torch.float16)
    bad[3] = float("nan")
    path = write_safetensors(tmp_path / "dmd2_sd15.safetensors", shapes, tensors={"conv_in.bias": bad})
    det, sd = load_student(path, check_nan=False)
    assert det.recipe == "dmd2_sd15_1step"
    ldm = to_ldm_unet(det, sd)
    assert ldm["input_blocks.0.0.bias"] is sd["conv_in.bias"] and len(ldm) == len(sd)
    with pytest.raises(StudentLoadError, match="NaN or Inf: conv_in.bias"):
        check_finite({k: sd[k] for k in ("conv_in.bias", "conv_out.bias")}, path)


def test_lora_for_another_base(tmp_path):
    det = detect(write_safetensors(tmp_path / "dmd2_sdxl_4step_lora.safetensors", kohya_lora_shapes("sdxl")))
    check_lora_base(det, "sdxl")
    with pytest.raises(StudentLoadError, match="LoRA is for sdxl but the model it is applied to is sd15"):
        check_lora_base(det, "sd15")
    with pytest.raises(StudentLoadError, match="holds no UNet"):
        to_ldm_unet(det, {})


def test_override_contradicting_the_file(tmp_path):
    path = write_safetensors(tmp_path / "sd_turbo.safetensors", unet_shapes("sd21", "ldm_checkpoint"))
    _raises(path, "is for sdxl but the file is a sd21 model", override="dmd2_sdxl_1step")
    with pytest.raises(ValueError, match="unknown student recipe"):
        detect(path, override="made_up")


def test_missing_file_and_empty_folder(tmp_path):
    _raises(tmp_path / "nope.safetensors", "does not exist")
    _raises(tmp_path, "no diffusers UNet")
    (tmp_path / "m.onnx").write_bytes(b"x")
    _raises(tmp_path / "m.onnx", "unsupported file type")


def test_an_unreadable_pickle_is_a_load_error(tmp_path, monkeypatch):
    """The torch.save check of a .pkl reads the file too: a permission error there is the loader's
    'cannot be read' message, not a PermissionError traceback (inspect and the loader node)."""
    from comfyui_fewstep.distill_loaders import safetensors_header

    path = tmp_path / "snapshot.pkl"
    path.write_bytes(b"\x80\x04K\x01.")

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(safetensors_header, "is_torch_save_file", denied)
    with pytest.raises(StudentLoadError, match="cannot be read .Permission denied"):
        safetensors_header.read_contents(path)
