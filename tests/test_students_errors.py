"""Bad input: every failure is a StudentLoadError naming the file and what to do."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch
from comfyui_fewstep.distill_loaders.detect import detect
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.load import check_finite, check_lora_base, load_student, to_ldm_unet
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
