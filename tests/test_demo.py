"""The bundled tiny teacher, the demo command and the teacher's training script."""

from __future__ import annotations

import importlib.util
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_fewstep.demo import WEIGHTS_PATH, load_teacher
from comfyui_fewstep.demo.__main__ import main as demo_main
from comfyui_fewstep.demo.baselines import sample_euler, sample_heun
from comfyui_fewstep.demo.image import PNG_SIGNATURE, grid, tile, write_png
from comfyui_fewstep.demo.network import edm_coefficients
from comfyui_fewstep.demo.presets import PRESETS
from comfyui_fewstep.demo.run import fixed_noise, parameterization_of, reference_samples, rmse_per_sample
from comfyui_fewstep.demo.teacher import read_metadata
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.schedules import get_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


@pytest.fixture(scope="module")
def noise(teacher):
    cfg = teacher.config
    return fixed_noise(12, (cfg.channels, cfg.resolution, cfg.resolution), seed=1)


@pytest.fixture(scope="module")
def reference(teacher, noise):
    return reference_samples(teacher, noise, steps=100)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == PNG_SIGNATURE
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + length
    return out


def _decode_grey(data: bytes) -> np.ndarray:
    chunks = _chunks(data)
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    assert chunks[0][0] == b"IHDR" and depth == 8 and color == 0 and chunks[-1][0] == b"IEND"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every scanline
    return rows[:, 1:]


# -- the committed weights ---------------------------------------------------------------------

def test_committed_weights_are_small_and_documented():
    assert WEIGHTS_PATH.is_file() and WEIGHTS_PATH.stat().st_size < 2_000_000
    meta = read_metadata()
    assert meta["training_command"].startswith("python tools/train_tiny_teacher.py")
    assert (WEIGHTS_PATH.parent / "tiny_teacher.md").read_text().count(meta["training_command"]) >= 1


def test_teacher_loads_with_the_sampler_contract(teacher):
    cfg = teacher.config
    assert (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, cfg.channels, cfg.resolution, cfg.resolution)
    for sigma in (0.002, 0.5, 80.0):
        out = teacher(x * sigma, torch.full((3,), sigma))
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # a scalar sigma broadcasts like a batch of equal sigmas
    torch.testing.assert_close(teacher(x, 1.0), teacher(x, torch.ones(3)))
    with pytest.raises(ValueError, match="sigma has 2 entries"):
        teacher(x, torch.ones(2))


def test_edm_preconditioning_matches_karras_table_1():
    sd = 0.5
    sigma = torch.tensor([1e-4, sd, 80.0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out[1], torch.tensor(sd / 2**0.5))
    torch.testing.assert_close(c_in[1], torch.tensor(1 / (sd * 2**0.5)))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # sigma_data^2 / (sigma^2 + sigma_data^2) + sigma^2 / (sigma^2 + sigma_data^2) = 1 for every sigma
    torch.testing.assert_close(c_skip + (c_out / sd) ** 2, torch.ones(3))


def test_teacher_is_identity_at_tiny_noise_and_denoises(teacher, reference):
    x0 = reference
    torch.testing.assert_close(teacher(x0, 1e-4), x0, atol=2e-3, rtol=0)
    gen = torch.Generator().manual_seed(3)
    sigma = 0.5
    noisy = x0 + sigma * torch.randn(x0.shape, generator=gen)
    err_in = rmse_per_sample(noisy, x0).median()
    err_out = rmse_per_sample(teacher(noisy, sigma), x0).median()
    assert err_out < 0.5 * err_in


def test_samples_look_like_digit_images(reference):
    # digits: a dark background (-1) with bright strokes; the samples use that range
    assert reference.min() > -1.3 and reference.max() < 1.3
    dark = (reference < -0.8).float().mean()
    bright = (reference > 0.2).float().mean()
    assert 0.3 < dark < 0.8 and bright > 0.1


# -- convergence with NFE ------------------------------------------------------------------------

def test_error_to_reference_shrinks_with_nfe(teacher, noise, reference):
    p = parameterization_of(teacher)
    errors = {}
    for name, fn in (("euler", sample_euler), ("dpmpp_2m", None)):
        for nfe in (4, 8, 16, 32):
            sigmas = get_sigmas("karras", nfe, p)
            x = noise * float(sigmas[0])
            if fn is None:
                out = sample_dpmpp_multistep(teacher, x, sigmas, disable=True, parameterization=p, order=2)
            else:
                out = fn(teacher, x, sigmas)
            errors[name, nfe] = float(rmse_per_sample(out, reference).median())
    for name in ("euler", "dpmpp_2m"):
        seq = [errors[name, n] for n in (4, 8, 16, 32)]
        assert all(a > b for a, b in itertools.pairwise(seq)), (name, seq)
    # first order: doubling the steps roughly halves Euler's error; 2M is far more accurate
    assert 1.4 < errors["euler", 16] / errors["euler", 32] < 3.0
    assert errors["dpmpp_2m", 16] < 0.5 * errors["euler", 16]


def test_euler_equals_first_order_dpmpp_in_ve_form(teacher, noise):
    p = parameterization_of(teacher)
    sigmas = get_sigmas("karras", 6, p)
    x = noise * float(sigmas[0])
    euler = sample_euler(teacher, x, sigmas)
    ddim = sample_dpmpp_multistep(teacher, x, sigmas, disable=True, parameterization=p, order=1)
    torch.testing.assert_close(euler, ddim, atol=1e-4, rtol=1e-4)


def test_heun_makes_two_calls_per_step_but_one_into_zero(teacher, noise):
    calls = []
    p = parameterization_of(teacher)
    sigmas = get_sigmas("karras", 4, p)

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return teacher(x, sigma)

    sample_heun(model, noise * float(sigmas[0]), sigmas)
    assert len(calls) == 2 * 4 - 1 and 0.0 not in calls


# -- the demo command ------------------------------------------------------------------------

def test_demo_quick_writes_grid_and_prints_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for preset in PRESETS:
        assert preset.name in printed
    assert "NFE 3" in printed and "NFE 12" in printed and "median per-sample RMSE" in printed

    data = (out / "grid.png").read_bytes()
    pixels = _decode_grey(data)
    cell = 4 * (2 * (8 + 1) + 1)  # 2x2 samples of 8x8 with 1-px padding, enlarged 4x
    n_rows, n_cols = len(PRESETS), 3 + 1  # quick NFEs 3, 6, 12 plus the reference column
    assert pixels.shape == (n_rows * (cell + 4) + 4, n_cols * (cell + 4) + 4)
    assert pixels.std() > 20  # not a blank image

    import json

    errors = json.loads((out / "errors.json").read_text())["errors"]
    # the 3rd-order samplers beat Euler at the largest quick budget
    assert errors["dpmpp_3m"]["12"] < errors["euler"]["12"]


def test_demo_rejects_unknown_sampler(capsys):
    with pytest.raises(SystemExit):
        demo_main(["--samplers", "nope"])
    assert "unknown sampler" in capsys.readouterr().err


def test_png_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    data = write_png(tmp_path / "a.png", image, text={"Rows": "a, b"}).read_bytes()
    np.testing.assert_array_equal(_decode_grey(data), image)
    assert (b"tEXt", b"Rows\0a, b") in _chunks(data)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", image.astype(np.float32))


def test_grid_layout_places_tiles():
    a = np.full((2, 2), 255, np.uint8)
    t = tile(np.stack([a, a, a]), columns=2, pad=1, fill=0)
    assert t.shape == (7, 7) and t[1:3, 1:3].min() == 255 and t[4:6, 4:6].max() == 0
    g = grid([[a, None]], scale=2, gap=1, fill=9)
    assert g.shape == (6, 11) and g[1:5, 1:5].min() == 255 and g[1:5, 6:10].max() == 9


# -- the training script ---------------------------------------------------------------------

def _train_module():
    path = ROOT / "tools" / "train_tiny_teacher.py"
    spec = importlib.util.spec_from_file_location("train_tiny_teacher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_data_preparation_is_deterministic():
    pytest.importorskip("sklearn")
    train = _train_module()
    a, b = train.prepare_digits(8), train.prepare_digits(8)
    assert a.shape == (1797, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.min() == -1.0 and a.max() == 1.0
    assert train.prepare_digits(16).shape == (1797, 1, 16, 16)


def test_training_smoke_run_is_reproducible_and_loadable(tmp_path):
    pytest.importorskip("sklearn")
    train = _train_module()
    threads = torch.get_num_threads()
    args = ["--iters", "2", "--batch", "8", "--threads", "1", "--log-every", "1"]
    try:
        assert train.main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
        assert train.main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = load_teacher(tmp_path / "a.safetensors"), load_teacher(tmp_path / "b.safetensors")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert "--iters 2" in read_metadata(tmp_path / "a.safetensors")["training_command"]


def test_demo_refuses_bad_paths_and_counts_before_sampling(tmp_path, capsys, monkeypatch):
    """An output path that is a file, weights that are not a teacher, or --samples 0: one line and
    exit code 2 before any sampling (an unwritable --out failed only after all the sampling)."""
    from comfyui_fewstep.demo import __main__ as demo

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the paths were checked")

    monkeypatch.setattr(demo, "run_demo", no_sampling)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not a model")
    for args, message in (
        (["--out", str(a_file / "sub")], "cannot write to the output folder"),
        (["--out", str(tmp_path / "o"), "--weights", str(tmp_path / "missing.safetensors")], "cannot load"),
        (["--out", str(tmp_path / "o"), "--weights", str(not_weights)], "cannot load the teacher weights"),
        (["--out", str(tmp_path / "o"), "--samples", "0"], "must be >= 1"),
    ):
        assert demo_main([*args, "--quick", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
