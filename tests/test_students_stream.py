"""Streaming safetensors reads into preallocated tensors (the loader's one-copy path)."""

from __future__ import annotations

import pytest
import torch
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.safetensors_header import read_contents
from comfyui_fewstep.distill_loaders.stream import placeholder_state_dict, read_tensor, stream_into
from safetensors.torch import load_file, save_file


@pytest.fixture
def sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 32, 3, 3, generator=g).half(),
        "b.weight": torch.randn(300, 7, generator=g),
        "c.bias": torch.randn(5, generator=g).bfloat16(),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "sample.safetensors"
    save_file(tensors, str(path))
    return path


def test_stream_matches_safetensors_load(sample):
    ref = load_file(str(sample))
    contents = read_contents(sample)
    direct = {k: torch.empty_like(v) for k, v in ref.items()}  # same dtype: read straight into memory
    stream_into(contents, direct)
    for k, v in ref.items():
        assert torch.equal(direct[k], v), k
    cast = {k: torch.empty(v.shape, dtype=torch.float64) for k, v in ref.items()}  # dtype cast on copy
    stream_into(contents, cast)
    for k, v in ref.items():
        assert torch.equal(cast[k], v.double()), k
    t = torch.empty(32, 64, 3, 3, dtype=torch.float16).transpose(0, 1)  # non-contiguous destination
    stream_into(contents, {"a.weight": t})
    assert torch.equal(t, ref["a.weight"])
    assert torch.equal(read_tensor(contents, "b.weight"), ref["b.weight"])
    p = torch.nn.Parameter(torch.empty(300, 7))  # parameters that require grad are filled in place
    stream_into(contents, {"b.weight": p})
    assert torch.equal(p.detach(), ref["b.weight"]) and p.requires_grad


def test_placeholders_hold_no_memory(sample):
    contents = read_contents(sample)
    ph = placeholder_state_dict(contents)
    assert {k: (tuple(v.shape), v.dtype) for k, v in ph.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in load_file(str(sample)).items()
    }
    assert all(v.untyped_storage().nbytes() <= 8 for v in ph.values())
    assert float(ph["a.weight"].abs().max()) == 0.0


def test_stream_errors_name_the_tensor(tmp_path, sample):
    contents = read_contents(sample)
    with pytest.raises(
        StudentLoadError, match="'a.weight' has shape \\[64, 32, 3, 3\\] but the model expects"
    ):
        stream_into(contents, {"a.weight": torch.empty(64, 32, 1, 1, dtype=torch.float16)})
    with pytest.raises(StudentLoadError, match="no tensor 'zzz'"):
        stream_into(contents, {"zzz": torch.empty(1)})
    bad = {
        "ok": torch.ones(4),
        "nan.weight": torch.tensor([1.0, float("nan")]).half(),
        "inf.bias": torch.tensor([float("-inf")]),
    }
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    contents = read_contents(path)
    targets = {k: torch.empty_like(v) for k, v in bad.items()}
    with pytest.raises(StudentLoadError) as err:
        stream_into(contents, targets)
    message = str(err.value)
    listed = message.split("2 weight tensor(s) contain NaN or Inf: ")[1].split(". What to do")[0]
    assert sorted(listed.split(", ")) == ["inf.bias", "nan.weight"]
    stream_into(contents, targets, check_finite=False)
    assert torch.isnan(targets["nan.weight"][1])
