"""Test set-up: import the checkout as ``comfyui_fewstep`` and find ComfyUI when asked.

The package alias mirrors what ComfyUI's loader does (a spec from the root ``__init__.py``
with the root as its search location), so a fresh clone runs ``python -m pytest`` and the
tests always exercise the checkout they live in.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_fewstep"


def _alias_package() -> None:
    module = sys.modules.get(PACKAGE)
    if module is not None and Path(module.__file__).resolve().parent == ROOT:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_alias_package()


def _load_module(name: str, path: Path):
    """The module in the file ``path``, imported as ``name`` (``--import-mode=importlib`` puts no test
    folder on sys.path, and the benchmarks' folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _load_helper(name: str):
    """A ``tests/_<name>.py`` helper module."""
    return _load_module(f"fewstep_tests_{name}", ROOT / "tests" / f"_{name}.py")


@pytest.fixture(scope="session")
def bench_harness():
    """``bench/_harness.py``, the benchmarks' shared measurements."""
    return _load_module("fewstep_bench_harness", ROOT / "bench" / "_harness.py")


@pytest.fixture(scope="session")
def bench_comfy(comfy):
    """``bench/_comfy.py``, the benchmarks' driver of ComfyUI's samplers, with ComfyUI imported."""
    return _load_module("fewstep_bench_comfy", ROOT / "bench" / "_comfy.py")


@pytest.fixture(scope="session")
def guided_preset_errors():
    """``tests/_guided.py``'s ``preset_errors``: the few-step preset on a guided Gaussian mixture."""
    return _load_helper("guided").preset_errors


#: modules ComfyUI imports at start-up, by import name (its requirements.txt lists distributions)
COMFY_IMPORTS = ("psutil", "yaml", "PIL", "aiohttp", "safetensors", "einops", "scipy", "tqdm", "transformers")


def comfy_skip_reason() -> str | None:
    """Why the ComfyUI tests cannot run here, or None when ``COMFYUI_PATH`` is usable."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return "needs ComfyUI: set COMFYUI_PATH to a ComfyUI checkout (its requirements installed)"
    if not (Path(value) / "comfy").is_dir():
        return f"COMFYUI_PATH={value} is not a ComfyUI checkout (no comfy/ folder in it)"
    missing = [name for name in COMFY_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        return (f"ComfyUI's requirements are not installed in this environment (missing: "
                f"{', '.join(missing)}): pip install -r {value}/requirements.txt")
    return None


def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH`` when its tests can run here, or None."""
    return None if comfy_skip_reason() else Path(os.environ["COMFYUI_PATH"])


NEEDS_COMFY = "needs ComfyUI: set COMFYUI_PATH to a ComfyUI checkout (its requirements installed)"


def pytest_collection_modifyitems(config, items):
    skip_comfy = pytest.mark.skip(reason=comfy_skip_reason() or NEEDS_COMFY)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "comfy" in item.keywords and comfyui_path() is None:
            item.add_marker(skip_comfy)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny tensors and models gain nothing from the thread pool,
    and one thread keeps timings steady on a busy CPU. Use with ``pytest.mark.usefixtures``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UnetCallCounter:
    """Counts diffusion-model forwards through ComfyUI's unet wrapper slot
    (``model.set_model_unet_function_wrapper(counter)``)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, apply_model, args):
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.fixture()
def unet_counter() -> UnetCallCounter:
    """A fresh :class:`UnetCallCounter`."""
    return UnetCallCounter()


#: a 16x16 RGB, 10-class EDM generator small enough for any test
TINY_EDM = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


@pytest.fixture()
def tiny_edm():
    """``tiny_edm(arch="SongUNet", seed=0, **changes)``: our EDM network (:data:`TINY_EDM` config)
    with seeded N(0, 0.05^2) weights."""
    from comfyui_fewstep.distill_loaders.edm_networks import build_edm_network

    def make(arch: str = "SongUNet", seed: int = 0, **changes) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = build_edm_network(arch, **{**TINY_EDM, **changes})
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return net

    return make


@pytest.fixture(scope="session")
def comfy():
    """Import ComfyUI from ``COMFYUI_PATH`` in CPU mode and return its root path."""
    path = comfyui_path()
    if path is None:
        pytest.skip(comfy_skip_reason() or NEEDS_COMFY)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets, before the device probe
    import comfy.model_management  # noqa: F401

    return path


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (``main.py --cpu``, this checkout its only pack) for the whole session.

    Started on first use and stopped at the end of the session; see ``tests/_comfy_server.py``.
    It logs at DEBUG level (the model loader reports missing and unexpected keys there). Tests
    that need a model file link it in with ``comfy_server.link_model(folder, path)``.
    """
    path = comfyui_path()
    if path is None:
        pytest.skip(comfy_skip_reason() or NEEDS_COMFY)
    base = tmp_path_factory.mktemp("comfy_base")
    server = _load_helper("comfy_server").ComfyServer(path, base, extra_args=("--verbose", "DEBUG"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_comfy_model(comfy):
    """A real ComfyUI ``ModelPatcher`` around a tiny SD1.5-shaped UNet (random weights, CPU).

    Built from ``comfy.supported_models.SD15`` with a shrunken ``unet_config`` (32 channels, two
    levels, one transformer block each; context 768 like SD1.5), so it runs through ComfyUI's
    real ``BaseModel`` / EPS ``model_sampling`` / guider code in well under a second per step.
    Conditioning for it: ``tiny_comfy_conds``.
    """
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "num_head_channels": 8, "context_dim": 768,
        "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False, "use_spatial_transformer": True, "legacy": False,
    }
    model = comfy.supported_models.SD15(unet_config).get_model({}, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # get_model leaves weights uninitialised: fan-in scaled normal, unit norms
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="session")
def tiny_comfy_conds():
    """(positive, negative) CONDITIONING for ``tiny_comfy_model`` (SD1.5-shaped cross-attention)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    return positive, negative
