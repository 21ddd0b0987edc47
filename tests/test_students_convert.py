"""The restricted-unpickler converter: tensors out, code never run."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
import warnings

import pytest
import torch
from comfyui_fewstep.distill_loaders.convert_pickle import convert, main, restricted_load
from comfyui_fewstep.distill_loaders.errors import StudentLoadError, UnsafePickleError
from safetensors import safe_open
from safetensors.torch import load_file


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickled_module_converts_to_its_state_dict(tmp_path, protocol):
    model = _model()
    src = tmp_path / "snapshot.pkl"
    src.write_bytes(pickle.dumps({"ema": model, "step": 7}, protocol=protocol))
    dst, cfg = convert(src)
    got = load_file(str(dst))
    want = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    config = json.loads(cfg.read_text())
    assert config["modules"]["<root>"]["class"] == "torch.nn.modules.container.Sequential"
    assert config["modules"]["0"]["class"] == "torch.nn.modules.conv.Conv2d"


def test_model_classes_are_never_imported(tmp_path, monkeypatch):
    """A SiD/EDM-like pickle whose class lives in ``training.networks``: converted without that module."""
    mod = types.ModuleType("training.networks")

    class SongUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.map_layer0 = torch.nn.Linear(4, 8)
            self.enc = torch.nn.ModuleDict({"32x32_conv": torch.nn.Conv2d(3, 8, 3)})
            self._init_kwargs = {"img_resolution": 32, "model_channels": 8}

    class EDMPrecond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = SongUNet()
            self._init_kwargs = {"sigma_data": 0.5}

    SongUNet.__module__ = EDMPrecond.__module__ = "training.networks"
    SongUNet.__qualname__, EDMPrecond.__qualname__ = "SongUNet", "EDMPrecond"
    mod.SongUNet, mod.EDMPrecond = SongUNet, EDMPrecond
    monkeypatch.setitem(sys.modules, "training", types.ModuleType("training"))
    monkeypatch.setitem(sys.modules, "training.networks", mod)
    net = EDMPrecond()
    src = tmp_path / "network-snapshot-1.200000-403968.pkl"
    src.write_bytes(pickle.dumps({"ema": net}))
    monkeypatch.delitem(sys.modules, "training.networks")  # the converter must not need it
    monkeypatch.delitem(sys.modules, "training")
    dst, cfg = convert(src, tmp_path / "sid.safetensors")
    got = load_file(str(dst))
    want = {k[len("model.") :]: v for k, v in net.state_dict().items()}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["fewstep_format"] == "edm"
    modules = json.loads(cfg.read_text())["modules"]
    assert modules["<root>"] == {"class": "training.networks.EDMPrecond", "init_kwargs": {"sigma_data": 0.5}}
    assert modules["model"]["init_kwargs"] == {"img_resolution": 32, "model_channels": 8}
    assert "training.networks" not in sys.modules


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_reduce_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"ema": {"w": torch.ones(2)}, "payload": _Evil(marker)}))
    with pytest.raises(UnsafePickleError, match=r"asks to call (os|posix)\.system.*nothing was run") as info:
        convert(src)
    assert not marker.exists()
    assert info.value.path == str(src) and isinstance(info.value, StudentLoadError)
    assert not (tmp_path / "evil.safetensors").exists()
    src.write_bytes(pickle.dumps([torch.ones(1), _Eval()]))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_load(src)


def test_bad_pickles(tmp_path, capsys):
    src = tmp_path / "cut.pkl"
    src.write_bytes(pickle.dumps({"ema": _model()})[:200])
    with pytest.raises(StudentLoadError, match="cannot be read"):
        convert(src)
    src.write_bytes(pickle.dumps({"ema": {"a": 1}}))
    with pytest.raises(StudentLoadError, match="holds no tensors"):
        convert(src)
    src.write_bytes(pickle.dumps({"G": {"w": torch.ones(1)}}))
    with pytest.raises(StudentLoadError, match="no entry 'x'"):
        convert(src, key="x")
    torch.save({"w": torch.ones(1)}, tmp_path / "zip.pt")
    assert main([str(tmp_path / "zip.pt")]) == 1
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pytorch_model.bin", "student.pkl"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_files_are_named_as_such(tmp_path, zip_format, name):
    """A torch.save state dict (DMD2's pytorch_model.bin, zip or legacy format) needs no conversion:
    the converter says so instead of calling it truncated or empty, and the loaders read it, even
    under a pickle's name (they refused a .pkl by its extension and sent it back to convert)."""
    from comfyui_fewstep.distill_loaders.load import load_weights
    from comfyui_fewstep.distill_loaders.safetensors_header import read_contents

    src = tmp_path / name
    torch.save({"model.w": torch.ones(2)}, src, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(StudentLoadError, match=f"{name}.*torch.save file.*needs no conversion.*"
                                               "pick it in the loader node"):
        convert(src)
    assert list(read_contents(src).tensors) == ["model.w"]
    assert torch.equal(load_weights(src)["model.w"], torch.ones(2))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"ema": {"w": torch.ones(1)}}))
    with pytest.raises(StudentLoadError, match="this is a Python pickle.*convert it first"):
        read_contents(plain)


def test_cli(tmp_path, capsys):
    from comfyui_fewstep.cli import main as cli

    src = tmp_path / "m.pkl"
    src.write_bytes(pickle.dumps({"ema": _model()}))
    assert cli(["convert", str(src), "-o", str(tmp_path / "out.safetensors")]) == 0
    assert (tmp_path / "out.safetensors").exists() and (tmp_path / "out.json").exists()


def test_cli_outputs_never_destroy_files_and_failures_are_one_line(tmp_path, capsys):
    """The input, an existing output and the weights under their own .json name are never
    overwritten without --force; missing or unwritable paths are one line, not a traceback; the
    converted file is readable by the user ComfyUI runs as (umask mode, not 0600)."""
    from comfyui_fewstep.cli import main as cli

    src = tmp_path / "m.pkl"
    src.write_bytes(pickle.dumps({"ema": _model()}))
    before = src.read_bytes()
    cases = [
        ([str(src), "-o", str(src)], "overwrite the input"),
        ([str(src), "-o", str(tmp_path / "out.json")], "its own .json config"),
        ([str(tmp_path / "missing.pkl")], "does not exist"),
        ([str(tmp_path)], "is a folder"),
        ([str(src), "-o", str(tmp_path / "no" / "out.safetensors")], "does not exist"),
    ]
    for args, message in cases:
        assert cli(["convert", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert src.read_bytes() == before
    old = os.umask(0o022)
    try:
        assert cli(["convert", str(src)]) == 0
        assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
        assert cli(["convert", str(src)]) == 1
        assert "already exist" in capsys.readouterr().err
        assert cli(["convert", str(src), "--force"]) == 0
    finally:
        os.umask(old)


def test_pickled_diffusers_unet_like_sid_lsg(tmp_path):
    """SiD-LSG saves ``dict(ema=<diffusers UNet2DConditionModel>)``; convert it without diffusers' code."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    src = tmp_path / "batch512_cfg1.51.51.5_t625_8806_v2.pkl"
    src.write_bytes(pickle.dumps({"ema": unet}))
    dst, cfg = convert(src)
    got, want = load_file(str(dst)), unet.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    root = json.loads(cfg.read_text())["modules"]["<root>"]
    assert root["class"] == "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel"
    assert root["init_kwargs"]["cross_attention_dim"] == 32 and root["init_kwargs"]["block_out_channels"] == [
        32,
        64,
    ]


# ----------------------------------------------------------------------------- crafted pickles


class _View:
    """Pickles as torch's own tensor rebuild call with any view of a storage (and BUILD state)."""

    def __init__(self, storage, offset, size, stride, state=None):
        self.args, self.state = (storage, offset, tuple(size), tuple(stride), False, {}), state

    def __reduce__(self):
        rebuild = (torch._utils._rebuild_tensor_v2, self.args)
        return rebuild if self.state is None else (*rebuild, self.state)


def _storage(n=4):
    """A TypedStorage, which pickles as ``torch.storage._load_from_bytes`` (its getter warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.arange(float(n)).storage()


@pytest.mark.parametrize(("offset", "size", "stride", "what"), [
    (0, [1000], [1], "of 1000 elements ending at element 999 of a storage of 4"),  # past the end
    (10**6, [4], [1], "of 4 elements ending at element 1000003"),
    (3, [4], [-1], "with size \\[4\\], stride \\[-1\\]"),
    (0, [2**28], [0], "of 268435456 elements"),  # a broadcast view: 1 GiB from 16 bytes
])
def test_tensor_views_outside_their_storage_are_refused(tmp_path, offset, size, stride, what):
    """torch grows a storage to fit a larger view with uninitialised memory, which would end up in
    the output file; views must lie inside the storage the pickle gave."""
    path = tmp_path / "view.pkl"
    path.write_bytes(pickle.dumps({"w": _View(_storage(), offset, size, stride)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=f"builds a tensor view {what}"):
        restricted_load(path)


def test_build_cannot_change_functions_or_tensors(tmp_path):
    """BUILD on a global would set attributes of torch's or our own functions for the whole process,
    and BUILD on a tensor would re-point it past its storage: both are refused."""
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    on_function = (b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__X\x06\x00\x00\x00latin1"
                   b"\x85s\x86b.")
    (tmp_path / "fn.pkl").write_bytes(on_function)
    with pytest.raises(UnsafePickleError, match="BUILD on a global"):
        restricted_load(tmp_path / "fn.pkl")
    on_tensor = _View(_storage(), 0, [4], [1], state=(_storage(), 0, (1000,), (1,)))
    (tmp_path / "t.pkl").write_bytes(pickle.dumps({"w": on_tensor}, protocol=2))
    with pytest.raises(UnsafePickleError, match="BUILD on a tensor"):
        restricted_load(tmp_path / "t.pkl")
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


def test_shared_and_self_containing_containers_are_walked_once(tmp_path):
    """A list holding the previous level twice, 40 levels deep, is a few hundred bytes of pickle
    and 2^40 paths; a container inside itself never ends. Both convert in one pass."""
    level = [_View(_storage(), 0, [4], [1])]
    for _ in range(40):
        level = [level, level]
    cyclic = {"w": _View(_storage(), 0, [4], [1])}
    cyclic["self"] = cyclic
    for name, tree in (("dag", {"net": level}), ("cycle", cyclic)):
        src = tmp_path / f"{name}.pkl"
        src.write_bytes(pickle.dumps(tree, protocol=2))
        dst, _ = convert(src, tmp_path / f"{name}.safetensors")
        assert len(load_file(str(dst))) == 1


def test_a_tensor_named_like_the_safetensors_header_is_refused(tmp_path):
    src = tmp_path / "names.pkl"
    src.write_bytes(pickle.dumps({"__metadata__": _View(_storage(), 0, [4], [1])}, protocol=2))
    with pytest.raises(StudentLoadError, match="tensor named __metadata__"):
        convert(src, tmp_path / "names.safetensors")


def test_a_huge_memo_index_is_refused_before_the_unpickler_allocates_it(tmp_path):
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02N" + b"r" + (2**26).to_bytes(4, "little") + b".")  # LONG_BINPUT 67,108,864
    with pytest.raises(UnsafePickleError, match="asks for memo slot 67,108,864"):
        restricted_load(path)
