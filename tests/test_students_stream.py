"""Streaming safetensors reads into preallocated tensors (the loader's one-copy path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfyui_fewstep.distill_loaders import stream
from comfyui_fewstep.distill_loaders.errors import StudentLoadError
from comfyui_fewstep.distill_loaders.safetensors_header import read_contents
from comfyui_fewstep.distill_loaders.stream import (
    CHUNK_BYTES,
    placeholder_state_dict,
    read_tensor,
    stream_into,
)
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


@pytest.mark.parametrize("workers", [1, 3])
def test_stream_under_inference_mode_casts_into_inference_tensors(sample, workers):
    """ComfyUI runs nodes under ``torch.inference_mode``, so the model it builds there holds
    inference tensors. The cast path writes them from reader threads, which do not inherit the
    caller's mode: an in-place copy there must still be allowed."""
    ref = load_file(str(sample))
    with torch.inference_mode():
        cast = {k: torch.empty(v.shape, dtype=torch.float64) for k, v in ref.items()}
        assert all(t.is_inference() for t in cast.values())
        stream_into(read_contents(sample), cast, workers=workers)
    for k, v in ref.items():
        assert torch.equal(cast[k], v.double()), k


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


# ----------------------------------------------------------------------------- chunked NaN/Inf check

FLOAT_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
]


def _save(tmp_path, tensors, name="t.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return read_contents(path)


def _bad_names(contents, targets, limit=10**6):
    try:
        stream_into(contents, targets, limit=limit)
    except StudentLoadError as err:
        listed = str(err).split("contain NaN or Inf: ")[1].split(". What to do")[0]
        assert contents.path.name in str(err)
        return sorted(listed.split(", "))
    return []


def _multi_chunk(n_chunks=3.5, dtype=torch.float16, seed=0):
    n = int(n_chunks * CHUNK_BYTES) // torch.empty((), dtype=dtype).element_size()
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("path", ["direct", "cast", "staging"])
def test_nan_inf_found_in_any_chunk_of_a_large_tensor(tmp_path, path):
    """Tensors spanning several read chunks: a single NaN/Inf in the middle chunk, on a chunk
    boundary, or in the (partial) last chunk is found, through the direct read, the cast in the
    reader threads (another dtype) and the staging buffer (a non-contiguous destination of another
    dtype); the finite tensors around them pass and arrive intact."""
    big = _multi_chunk()
    assert big.numel() * 2 > 3 * CHUNK_BYTES
    per_chunk = CHUNK_BYTES // 2
    tensors = {"a.ok": big.clone(), "b.nan_middle": big.clone(), "c.neg_inf_last": big.clone()}
    tensors["d.nan_on_boundary"] = big.clone()
    tensors["e.ok"] = big.clone()
    tensors["b.nan_middle"][per_chunk + per_chunk // 2] = float("nan")
    tensors["c.neg_inf_last"][-1] = float("-inf")
    tensors["d.nan_on_boundary"][2 * per_chunk] = float("nan")
    contents = _save(tmp_path, tensors)
    dtype = torch.float16 if path == "direct" else torch.float32
    if path == "staging":
        targets = {k: torch.empty(v.shape + (2,), dtype=dtype)[..., 0] for k, v in tensors.items()}
        assert not targets["a.ok"].is_contiguous()
    else:
        targets = {k: torch.empty(v.shape, dtype=dtype) for k, v in tensors.items()}
    assert _bad_names(contents, targets) == ["b.nan_middle", "c.neg_inf_last", "d.nan_on_boundary"]
    assert torch.equal(targets["a.ok"], big.to(dtype)) and torch.equal(targets["e.ok"], big.to(dtype))
    assert torch.isnan(targets["d.nan_on_boundary"][2 * per_chunk])  # read completely all the same


def test_inf_in_the_last_chunk_of_a_non_contiguous_destination(tmp_path):
    w = _multi_chunk(2.25).reshape(-1, 64)
    w[-1, -1] = float("inf")
    contents = _save(tmp_path, {"w": w})
    dest = torch.empty(w.shape[1], w.shape[0], dtype=torch.float16).t()  # staging path, no cast
    with pytest.raises(StudentLoadError, match="1 weight tensor\\(s\\) contain NaN or Inf: w\\."):
        stream_into(contents, {"w": dest})
    stream_into(contents, {"w": dest}, check_finite=False)
    assert torch.equal(dest, w)


def test_huge_finite_values_never_error(tmp_path):
    """The largest finite value of every float dtype (6e4 in float16) and its negative, next to
    subnormals and -0, is finite: no error, and the bits arrive unchanged."""
    tensors = {}
    for dtype in FLOAT_DTYPES:
        info = torch.finfo(dtype)
        values = [info.max, -info.max, info.tiny, -info.smallest_normal, 0.0, -0.0, 1.0]
        t = torch.tensor(values, dtype=torch.float64).to(dtype)
        t = torch.cat([t, torch.full((CHUNK_BYTES // t.element_size() + 3,), info.max, dtype=dtype)])
        tensors[str(dtype)] = t
    tensors["f16.6e4"] = torch.full((CHUNK_BYTES,), 6e4, dtype=torch.float16)  # 2 chunks of 6e4
    contents = _save(tmp_path, tensors)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    stream_into(contents, targets)
    for k, v in tensors.items():
        assert torch.equal(targets[k].view(torch.uint8), v.view(torch.uint8)), k
    wide = {k: torch.empty(v.shape, dtype=torch.float64) for k, v in tensors.items()}
    stream_into(contents, wide)  # cast in the reader threads
    assert float(wide["f16.6e4"].min()) == 60000.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bitwise_check_agrees_with_isfinite_on_random_bits(tmp_path, dtype):
    """Random bit patterns (every NaN payload, both Infs, subnormals): the tensors the loader
    reports are exactly those where ``torch.isfinite`` finds a non-finite value."""
    size = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(size)
    n_values = {8: 512, 4: 64, 2: 8, 1: 32}[size]
    tensors = {}
    for i in range(300):
        bits = torch.randint(0, 256, (n_values * size,), dtype=torch.uint8, generator=g)
        tensors[f"t{i:03d}"] = bits.view(dtype)
    expected = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v.to(torch.float64)).all()))
    assert 10 < len(expected) < 290  # both outcomes are exercised
    contents = _save(tmp_path, tensors)
    assert _bad_names(contents, {k: torch.empty_like(v) for k, v in tensors.items()}) == expected


def test_ints_and_bools_are_not_checked(tmp_path):
    tensors = {"i": torch.full((10,), -1, dtype=torch.int16), "b": torch.ones(3, dtype=torch.bool)}
    contents = _save(tmp_path, tensors)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    stream_into(contents, targets)
    assert all(torch.equal(targets[k], v) for k, v in tensors.items())


def test_placeholder_copy_into_a_model_leaves_it_for_the_stream(tmp_path):
    """``load_state_dict`` of placeholders writes nothing (the stream fills every destination next);
    any other use of a placeholder sees plain zeros."""
    conv = torch.nn.Conv2d(3, 8, 3)
    ref = {"weight": torch.randn(8, 3, 3, 3).half(), "bias": torch.randn(8).half()}
    contents = _save(tmp_path, ref)
    conv.half()
    with torch.no_grad():
        conv.weight.fill_(7.0)
    ph = placeholder_state_dict(contents)
    conv.load_state_dict(ph)
    assert bool((conv.weight == 7.0).all())  # not overwritten by zeros
    plain = ph["weight"] + 1
    assert type(plain) is torch.Tensor and bool((plain == 1).all())
    derived = torch.full((8,), 3.0, dtype=torch.float16)
    derived.copy_(ph["bias"][:8].clone())  # a derived (plain) tensor copies as usual
    assert bool((derived == 0).all())
    stream_into(contents, dict(conv.named_parameters()))
    assert torch.equal(conv.weight.detach(), ref["weight"]) and torch.equal(conv.bias.detach(), ref["bias"])


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_reader_threads_give_the_same_result(sample, tmp_path, workers):
    big = {"x": _multi_chunk(5.5), "y": _multi_chunk(2.0, torch.float32, seed=1)}
    big["x"][-7] = float("nan")
    contents = _save(tmp_path, big)
    direct = {k: torch.empty_like(v) for k, v in big.items()}
    cast = {k: torch.empty(v.shape, dtype=torch.float64) for k, v in big.items()}
    for targets in (direct, cast):
        assert _bad_names(contents, targets) == ["x"]  # every chunk filled before the error
        assert all(torch.equal(targets[k], v.to(targets[k].dtype)) for k, v in big.items() if k != "x")
        assert torch.equal(targets["x"].isnan(), big["x"].isnan())


def test_errors_in_reader_threads_reach_the_caller(tmp_path, monkeypatch):
    """A truncated file and a failing check inside a reader thread raise in the caller (no hang,
    no reader thread left behind)."""
    import threading


    t = _multi_chunk(4.0)
    path = tmp_path / "cut.safetensors"
    save_file({"a": t.clone(), "b": t.clone()}, str(path))
    contents = read_contents(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - CHUNK_BYTES - 10)
    targets = {"a": torch.empty_like(t), "b": torch.empty_like(t)}
    with pytest.raises(StudentLoadError, match="the file ends inside tensor 'b'"):
        stream_into(contents, targets, workers=2)
    with pytest.raises(StudentLoadError, match="the file ends inside tensor 'b'"):
        stream_into(contents, {"b": torch.empty(t.shape, dtype=torch.float32)}, workers=2)  # cast
    with pytest.raises(StudentLoadError, match="the file ends inside tensor 'b'"):
        staged = torch.empty(t.shape + (2,), dtype=torch.float32)[..., 0]  # non-contiguous: staging
        stream_into(contents, {"b": staged}, workers=2)

    def broken(chunk, dtype):
        raise MemoryError("check failed")

    monkeypatch.setattr(stream, "all_finite", broken)
    with pytest.raises(MemoryError, match="check failed"):
        stream_into(contents, {"a": torch.empty_like(t)}, workers=2)
    assert not [th for th in threading.enumerate() if th.name.startswith("fewstep-read")]


def test_operating_system_read_errors_name_the_file(sample, monkeypatch):
    """An I/O error under the reader threads, or when the header is read, is a StudentLoadError
    naming the file and the system's reason (not a bare OSError)."""
    import builtins

    contents = read_contents(sample)

    def failing(self, *args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stream._ChunkReader, "read", failing)
    with pytest.raises(StudentLoadError, match=r"cannot be read \(Input/output error\).*sample.safetensors"):
        stream_into(contents, {"a.weight": torch.empty(64, 32, 3, 3, dtype=torch.float16)}, workers=2)
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(sample):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(StudentLoadError, match=r"cannot be read \(Permission denied\)"):
        read_contents(sample)


def test_split_gives_each_thread_one_consecutive_run_of_about_equal_bytes():
    sizes = [5, 1, 1, 1, 8, 2, 2, 3, 1, 4, 4] * 3
    pieces = [(i, n, f"t{i}", None, np.empty(n, dtype=np.uint8)) for i, n in enumerate(sizes)]
    for parts in (1, 2, 3, 8):
        runs = stream._split(pieces, parts)
        assert [p[0] for run in runs for p in run] == list(range(len(pieces)))  # all, in file order
        assert len(runs) <= parts
        loads = [sum(p[1] for p in run) for run in runs]
        assert max(loads) - min(loads) <= 2 * max(sizes)
    assert stream._split([], 4) == []
