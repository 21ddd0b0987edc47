"""The CUDA Graph node in real ComfyUI on CPU, with a tiny SD1.5-architecture UNet.

On CPU the node must pass every call through eagerly with one log line, bit-for-bit equal to
the unwrapped model. With the emulation backend swapped in, the same real sampling run goes
through the graph path (signatures, static buffers, replays, parity check) and must still be
bit-for-bit equal: this exercises the wrapper glue end to end without a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.comfy

TINY_SD15 = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture(scope="module")
def node_module(comfy):
    from comfyui_fewstep.nodes import cuda_graph_nodes

    return cuda_graph_nodes


def random_patcher(config_class: str, unet_config: dict, seed: int):
    """A ModelPatcher around ``comfy.supported_models.<config_class>`` with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_patcher():
    """A ModelPatcher around an SD1.5-architecture UNet (32 channels, 2 levels), random weights."""
    return random_patcher("SD15", TINY_SD15, 1)


def sample(patcher, seed=0, tokens=77, batch=1):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(batch, tokens, 768, generator=g), {}]]
    uncond = [[torch.randn(batch, tokens, 768, generator=g), {}]]
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return comfy.sample.sample(patcher, noise, 2, 4.0, "euler", "normal", cond, uncond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def _state(node_module, patcher):
    import comfy.patcher_extension as pe

    (fn,) = patcher.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, node_module.WRAPPER_KEY)
    return fn.__self__


def test_node_installs_keyed_wrapper_on_a_clone(node_module):
    import comfy.patcher_extension as pe

    base = tiny_patcher()
    options_before = repr(base.model_options)
    (out,) = node_module.FewStepCUDAGraph.execute(base, True, 3, 1, True, "auto").result
    assert out is not base and out.model is base.model
    assert len(out.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, node_module.WRAPPER_KEY)) == 1
    for kind in (pe.CallbacksMP.ON_PRE_RUN, pe.CallbacksMP.ON_CLEANUP, pe.CallbacksMP.ON_DETACH):
        assert len(out.get_callbacks(kind, node_module.WRAPPER_KEY)) == 1
    assert base.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL) == []
    assert repr(base.model_options) == options_before
    assert base.model.diffusion_model.__class__.__name__ == "UNetModel"  # never object-patched
    state = _state(node_module, out)
    assert state.runner.cache.max_entries == 3 and state.runner.warmup == 1

    # applying the node twice keeps one wrapper; enable=False removes it
    (twice,) = node_module.FewStepCUDAGraph.execute(out, True, 4, 2, True, "auto").result
    assert len(twice.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL)) == 1
    (off,) = node_module.FewStepCUDAGraph.execute(twice, False, 4, 2, True, "auto").result
    assert off.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL) == []
    assert off.get_all_wrappers(pe.WrappersMP.APPLY_MODEL) == []


TINY_SD3 = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "depth": 2,
            "num_patches": 64 * 64, "pos_embed_max_size": 64, "adm_in_channels": 32, "out_channels": 16,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 64, "out_features": 128}}}


def test_a_model_family_without_the_wrapper_point_is_reported_once(node_module, caplog):
    """SD3's MMDiT (like Stable Cascade, PixArt, HunyuanDiT) has no DIFFUSION_MODEL wrapper point in
    this ComfyUI: the node cannot graph it, and says so once instead of silently doing nothing."""
    import comfy.sample

    base = random_patcher("SD3", TINY_SD3, 3)
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "auto").result
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    noise = torch.randn(1, 16, 8, 8, generator=g)
    node_module._UNHOOKED_WARNED.discard("OpenAISignatureMMDITWrapper")
    with caplog.at_level(logging.WARNING, logger="comfyui_fewstep"):
        for _ in range(2):
            comfy.sample.sample(wrapped, noise, 2, 4.0, "euler", "simple", cond, cond,
                                torch.zeros_like(noise), seed=0, disable_pbar=True)
    lines = [r.getMessage() for r in caplog.records if "diffusion-model wrapper" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("CUDA graph: OpenAISignatureMMDITWrapper does not call")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comfyui_fewstep"):
        sample(node_module.FewStepCUDAGraph.execute(tiny_patcher(), True, 4, 1, True, "auto").result[0])
    assert "diffusion-model wrapper" not in caplog.text  # the UNet reaches it (and runs eagerly on CPU)


def test_bad_setting_is_an_error_and_a_failed_install_passes_the_model_through(node_module, caplog,
                                                                                monkeypatch):
    base = tiny_patcher()
    with pytest.raises(ValueError, match="attention must be one of .*got 'no_such_policy'"):
        node_module.FewStepCUDAGraph.execute(base, True, 4, 2, True, "no_such_policy")

    def broken(*args, **kwargs):
        raise RuntimeError("this ComfyUI has no DIFFUSION_MODEL wrappers")

    monkeypatch.setattr(node_module, "apply_cuda_graph", broken)
    with caplog.at_level(logging.ERROR):
        (out,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 2, True, "auto").result
    assert out is base and "passes through unchanged" in caplog.text


def test_cpu_falls_back_to_eager_with_one_log_line_and_identical_output(node_module, caplog):
    base = tiny_patcher()
    reference = sample(base)
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 2, True, "auto").result
    with caplog.at_level(logging.INFO, logger="comfyui_fewstep.cuda_graph"):
        out = sample(wrapped)
    assert torch.equal(out, reference)
    lines = [r.getMessage() for r in caplog.records if "running eagerly" in r.getMessage()]
    assert len(lines) == 1 and "CUDA device" in lines[0]
    stats = _state(node_module, wrapped).runner.stats
    assert stats.captures == 0 and sum(stats.eager_calls.values()) == 2  # 2 steps, cond+uncond batched


def test_graph_path_through_real_sampling_is_bit_identical(node_module):
    from comfyui_fewstep.cuda_graph.emulate import EmulatedGraphBackend

    base = tiny_patcher()
    references = [sample(base, seed=s) for s in (0, 1)]
    # ComfyUI on CPU attends with sub-quadratic attention, which the default policy refuses
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "unchecked").result
    state = _state(node_module, wrapped)
    backend = state.runner.backend = EmulatedGraphBackend()
    for seed, reference in zip((0, 1), references):
        assert torch.equal(sample(wrapped, seed=seed), reference)
    # a new prompt and seed reuse the graph: one capture, verified, then replays only
    assert backend.captures == 1 and state.runner.stats.verify_failures == 0
    assert state.runner.stats.replays == 4


def test_no_cudnn_sdpa_covers_calls_that_bypass_the_attention_override(node_module, monkeypatch):
    """While capturing with the cuDNN kernel excluded, ComfyUI's own SDPA priority list (which every
    comfy.ops SDPA call forces, with or without transformer_options) has no cuDNN entry and
    PyTorch's cuDNN SDPA switch is off; both come back afterwards, also after an error."""
    import comfy.ops
    from torch.nn.attention import SDPBackend

    listed = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    monkeypatch.setattr(comfy.ops, "SDPA_BACKEND_PRIORITY", listed, raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with node_module.no_cudnn_sdpa():
        assert comfy.ops.SDPA_BACKEND_PRIORITY == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        assert comfy.ops.SDPA_BACKEND_PRIORITY is listed and not torch.backends.cuda.cudnn_sdp_enabled()
    assert listed[0] == SDPBackend.CUDNN_ATTENTION and len(listed) == 3
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with pytest.raises(RuntimeError), node_module.no_cudnn_sdpa():
        raise RuntimeError("capture failed")
    assert len(listed) == 3 and torch.backends.cuda.cudnn_sdp_enabled() == before


def test_the_pinned_policy_captures_inside_no_cudnn_sdpa(node_module, monkeypatch):
    import comfy.ops
    from comfyui_fewstep.cuda_graph.emulate import EmulatedGraphBackend
    from torch.nn.attention import SDPBackend

    listed = [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    monkeypatch.setattr(comfy.ops, "SDPA_BACKEND_PRIORITY", listed, raising=False)
    seen = []

    class Watching(EmulatedGraphBackend):
        def capture(self, body, **kwargs):
            seen.append(list(comfy.ops.SDPA_BACKEND_PRIORITY))
            return super().capture(body, **kwargs)

    base = tiny_patcher()
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "sdpa_no_cudnn").result
    state = _state(node_module, wrapped)
    state.runner.backend = Watching()
    monkeypatch.setattr(node_module, "ineligible_reason", lambda facts: None)
    sample(wrapped)
    assert seen == [[SDPBackend.MATH]] and listed == [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 16,
    "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
    "guidance_embed": True,
}


def tiny_flux_patcher():
    """A ModelPatcher around a one-block Flux DiT with random weights: its forward takes eight
    positional arguments (guidance and ref_latents before control), not the UNet's six."""
    return random_patcher("Flux", TINY_FLUX, 2)


def sample_flux(patcher, seed=0):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5}
    cond = [[torch.randn(1, 8, 32, generator=g), extra]]
    noise = torch.randn(1, 16, 8, 8, generator=g)
    return comfy.sample.sample(patcher, noise, 2, 1.0, "euler", "simple", cond, cond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def test_flux_argument_layout_passes_through_eager_and_graph_paths(node_module):
    from comfyui_fewstep.cuda_graph.emulate import EmulatedGraphBackend

    base = tiny_flux_patcher()
    references = [sample_flux(base, seed=s) for s in (0, 1)]
    (eager,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "auto").result
    assert torch.equal(sample_flux(eager), references[0])  # CPU: the logged eager path
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "unchecked").result
    state = _state(node_module, wrapped)
    backend = state.runner.backend = EmulatedGraphBackend()
    for seed, reference in zip((0, 1), references):
        assert torch.equal(sample_flux(wrapped, seed=seed), reference)
    stats = state.runner.stats
    assert backend.captures == 1 and stats.replays == 4 and stats.verify_failures == 0


def test_host_side_options_are_part_of_the_key(node_module):
    """An option the forward reads on the host (rope_options, chroma_radiance_options) changes the
    recorded work: another value captures another graph instead of replaying the old one."""
    from comfyui_fewstep.cuda_graph import GraphedForward
    from comfyui_fewstep.cuda_graph.emulate import EmulatedGraphBackend

    def forward(x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        return x * transformer_options.get("rope_options", {}).get("scale_y", 1.0) + timesteps.view(-1, 1)

    class Executor:  # what ComfyUI hands a DIFFUSION_MODEL wrapper with no inner wrappers
        original, class_obj, wrappers, idx = staticmethod(forward), torch.nn.Linear(1, 1), [None], 0

        def __call__(self, *args, **kwargs):
            return forward(*args, **kwargs)

    class Base:
        pass

    base = Base()
    runner = GraphedForward(EmulatedGraphBackend(), warmup=1)
    state = node_module.ComfyGraphState(base, runner, "unchecked")
    x, t = torch.randn(2, 3), torch.ones(2)
    with torch.inference_mode():
        for scale in (1.0, 2.0, 1.0):
            options = {"cond_or_uncond": [0, 1], "sigmas": t, "rope_options": {"scale_y": scale}}
            out = state.wrapper(Executor(), x, t, None, None, None, options)
            assert torch.equal(out, x * scale + 1.0)
    assert runner.stats.captures == 2 and runner.stats.replays == 3


def test_weight_patch_changes_the_weight_key(node_module):
    import comfy.model_management as mm

    base = tiny_patcher()
    (wrapped,) = node_module.FewStepCUDAGraph.execute(base, True, 4, 1, True, "auto").result
    state = _state(node_module, wrapped)
    dm = base.model.diffusion_model
    mm.load_models_gpu([wrapped])
    before = state.weights_key(dm)
    assert state.weights_key(dm) == before
    lora = wrapped.clone()  # a LoRA after the node shares the graph state
    assert _state(node_module, lora) is state
    weight = dm.out[2].weight
    lora.add_patches({"diffusion_model.out.2.weight": (torch.full_like(weight, 0.01),)})
    mm.load_models_gpu([lora])
    try:
        assert state.weights_key(dm) != before
    finally:
        mm.unload_all_models()
