"""The CUDA-graph node and its ModelPatcher adapter (ComfyUI glue around ``cuda_graph``).

``apply_cuda_graph`` clones the ModelPatcher and registers, under one key, a
``WrappersMP.DIFFUSION_MODEL`` wrapper plus ``ON_PRE_RUN`` / ``ON_CLEANUP`` / ``ON_DETACH``
callbacks. The diffusion model itself is never object-patched, so LoRA keys, weight backups and
other wrappers keep working; clones made later (a LoRA after this node) share the graph state,
and their weight changes are seen through the weight key (patch uuid, loaded size, parameter
addresses). Every call gathers cheap facts, lets ``cuda_graph.GraphedForward`` replay a graph or
run eagerly with one logged reason, and never raises on its own account.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ..cuda_graph import (
    ATTENTION_POLICIES,
    CUDA_GRAPH_BACKEND,
    GraphedForward,
    ModelFacts,
    ineligible_reason,
    parameter_fingerprint,
    pin_sdpa_backends,
)
from ..cuda_graph.attention import sdpa_without_cudnn
from ..cuda_graph.signature import UnsupportedInput, options_key
from ._api import NODE_ID_PREFIX, io

__all__ = ["FORCE_EAGER_ENV", "WRAPPER_KEY", "ComfyGraphState", "FewStepCUDAGraph", "apply_cuda_graph"]

logger = logging.getLogger(__name__)

WRAPPER_KEY = "comfyui_fewstep.cuda_graph"
FORCE_EAGER_ENV = "FEWSTEP_CUDA_GRAPH_DISABLE"
"""Set to 1 to run every call eagerly (A/B comparisons) without editing the workflow."""


@contextlib.contextmanager
def no_cudnn_sdpa() -> Iterator[None]:
    """While warming up and recording: no SDPA call may pick the cuDNN attention kernel, including
    calls that bypass the attention override (``comfy.ops.scaled_dot_product_attention`` without
    ``transformer_options``, e.g. WAN Animate's face blocks). ComfyUI forces its backend priority
    list on every call (``sdpa_kernel(SDPA_BACKEND_PRIORITY, set_priority=True)``), so the entry
    is removed from that list, and PyTorch's own cuDNN SDPA switch is off; both are restored."""
    import comfy.ops

    from torch.nn.attention import SDPBackend

    priority = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    saved = list(priority) if isinstance(priority, list) else None
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        if saved is not None:
            priority[:] = [b for b in saved if b != SDPBackend.CUDNN_ATTENTION]
        torch.backends.cuda.enable_cudnn_sdp(False)
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        if saved is not None:
            priority[:] = saved


#: model families already reported as having no ``DIFFUSION_MODEL`` wrapper point
_UNHOOKED_WARNED: set[str] = set()


def _comfy():
    from comfy import patcher_extension
    from comfy.ldm.modules import attention

    return attention, patcher_extension


class ComfyGraphState:
    """Graph state of one CUDA Graph node output, shared by every clone made from it."""

    def __init__(self, base_model: Any, runner: GraphedForward, attention: str) -> None:
        self._base_model = weakref.ref(base_model)
        self.runner = runner
        self.attention = attention
        self._cheap_weights: tuple | None = None
        self._fingerprint: int | None = None
        self.model_calls = self.forward_calls = 0  # this run: apply_model calls, calls reaching us

    # ------------------------------------------------------------ callbacks
    def on_pre_run(self, patcher: Any) -> None:
        self.runner.new_run()
        self._fingerprint = None  # re-read parameter addresses once per sampling run
        self.model_calls = self.forward_calls = 0

    def count_model_call(self, executor, *args, **kwargs):
        """``WrappersMP.APPLY_MODEL`` wrapper: counts the model calls of a run, so that a model
        family whose forward has no ``DIFFUSION_MODEL`` wrapper point is reported, not silently
        left eager."""
        self.model_calls += 1
        return executor(*args, **kwargs)

    def on_cleanup(self, patcher: Any) -> None:
        logger.debug("CUDA graph: run finished: %s", self.runner.stats.summary())
        base = self._base_model()
        if self.model_calls and not self.forward_calls:
            family = type(getattr(base, "diffusion_model", None)).__name__
            if family not in _UNHOOKED_WARNED:
                _UNHOOKED_WARNED.add(family)
                logger.warning(
                    "CUDA graph: %s does not call ComfyUI's diffusion-model wrapper (%d model calls, none "
                    "reached this node), so it ran as usual, without graphs; this ComfyUI version offers "
                    "no hook for this model family", family, self.model_calls)
        if base is not None and getattr(base, "model_lowvram", False):
            self.runner.release_all(torch.device(patcher.load_device), "the model is now partially loaded")

    def on_detach(self, patcher: Any, unpatch_all: bool) -> None:
        """Free the graphs when the model is unloaded.

        ``load_models_gpu`` (0.3.64) detaches the loaded patcher with ``unpatch_all=False`` at
        the start of every sampling run and loads it again: the weights stay in place, so the
        graphs are kept and only the parameter addresses are re-read on the next call.
        """
        self._fingerprint = None
        if unpatch_all:
            self.runner.release_all(torch.device(patcher.load_device), "the model was unloaded")

    # ------------------------------------------------------------ per call
    def weights_key(self, diffusion_model: torch.nn.Module) -> tuple:
        base = self._base_model()
        cheap = (
            id(diffusion_model),
            str(getattr(base, "current_weight_patches_uuid", None)),
            getattr(base, "model_loaded_weight_memory", None),
        )
        if cheap != self._cheap_weights or self._fingerprint is None:
            self._cheap_weights = cheap
            self._fingerprint = parameter_fingerprint(diffusion_model)
        return cheap + (self._fingerprint,)

    def facts(self, executor: Any, x: torch.Tensor, transformer_options: dict) -> ModelFacts:
        attention, _ = _comfy()
        base = self._base_model()
        patcher = getattr(base, "current_patcher", None)
        hooks = patcher is not None and (
            getattr(patcher, "current_hooks", None) is not None or bool(getattr(patcher, "hook_patches", None))
        )
        return ModelFacts(
            device_type=x.device.type,
            grad_enabled=torch.is_grad_enabled(),
            lowvram=bool(getattr(base, "model_lowvram", False)),
            lowvram_patches=int(getattr(base, "lowvram_patch_counter", 0) or 0),
            weight_hooks=hooks,
            patches=tuple(k for k, v in transformer_options.get("patches", {}).items() if v),
            patches_replace=tuple(k for k, v in transformer_options.get("patches_replace", {}).items() if v),
            attention_override="optimized_attention_override" in transformer_options,
            attention_name=getattr(attention.optimized_attention, "__name__", "unknown"),
            attention_policy=self.attention,
            inner_wrappers=max(0, len(executor.wrappers) - executor.idx - 1),
            backend_reason=self.runner.backend.unavailable_reason(x.device),
        )

    def wrapper(self, executor, *args, **kwargs):
        """``WrappersMP.DIFFUSION_MODEL`` wrapper: the UNet/DiT forward, from a graph when possible.

        Every model family calls it with its own positional layout (the UNet passes ``x,
        timesteps, context, y, control, transformer_options``, Flux eight arguments, ...): the
        arguments pass through unchanged, and ``transformer_options`` is found by the wrapped
        forward's parameter name."""
        self.forward_calls += 1
        where = "transformer_options" if "transformer_options" in kwargs else _options_position(executor)
        if where == "transformer_options":
            options = kwargs["transformer_options"]
        elif where is not None and where < len(args):
            options = args[where]
        else:
            options, where = {}, None  # not passed: the forward uses its default
        tree = {
            "args": [a for i, a in enumerate(args) if i != where],
            "kwargs": {k: v for k, v in kwargs.items() if k != "transformer_options"},
        }

        def call(t: dict, opts: Any) -> Any:
            positional, named = list(t["args"]), dict(t["kwargs"])
            if where == "transformer_options":
                named["transformer_options"] = opts
            elif where is not None:
                positional.insert(where, opts)
            return executor(*positional, **named)

        def forward(t: dict) -> Any:
            return call(t, options)

        x = args[0] if args else kwargs.get("x")
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        facts_options = options if isinstance(options, dict) else {}
        capture_forward, key_extra, weights, capture_context = forward, (), None, None
        try:
            if os.environ.get(FORCE_EAGER_ENV, "") not in ("", "0"):
                blocked = "the environment variable FEWSTEP_CUDA_GRAPH_DISABLE is set"
            elif not isinstance(x, torch.Tensor):
                blocked = "the model's first input is not a tensor"
            else:
                blocked = ineligible_reason(self.facts(executor, x, facts_options))
            if blocked is None:
                weights = self.weights_key(executor.class_obj)
                cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
                pin = pin_sdpa_backends(self.attention, cudnn)
                key_extra = (tuple(facts_options.get("cond_or_uncond", ()) or ()), pin,
                             torch.is_autocast_enabled(), options_key(options))
                capture_options = dict(facts_options)
                if pin:
                    capture_options["optimized_attention_override"] = sdpa_without_cudnn
                    capture_context = no_cudnn_sdpa

                def capture_forward(t: dict) -> Any:
                    return call(t, capture_options)
        except UnsupportedInput as e:
            blocked = str(e)
        except Exception as e:  # never let the gate itself break sampling
            logger.debug("CUDA graph: eligibility check failed", exc_info=True)
            blocked = f"internal error while checking eligibility ({type(e).__name__}: {e})"
        return self.runner(forward, tree, device=device, key_extra=key_extra, weights=weights,
                           blocked=blocked, capture_forward=capture_forward, capture_context=capture_context)


_OPTIONS_POSITION: dict[tuple[type, str], int | None] = {}


def _options_position(executor: Any) -> int | None:
    """Where ``transformer_options`` sits among the positional parameters of the forward the
    executor wraps (the UNet's ``_forward``: 5; Flux's: 7), or None when it has no such parameter."""
    function = getattr(executor, "original", None) or getattr(executor.class_obj, "_forward", None)
    if function is None:
        return None
    key = (type(executor.class_obj), getattr(function, "__qualname__", repr(function)))
    if key not in _OPTIONS_POSITION:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            _OPTIONS_POSITION[key] = None
        else:
            names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            found = "transformer_options" in names
            _OPTIONS_POSITION[key] = names.index("transformer_options") if found else None
    return _OPTIONS_POSITION[key]


def apply_cuda_graph(model: Any, *, enable: bool = True, max_graphs: int = 4, warmup: int = 2, verify: bool = True,
                     tolerance: float = 1e-3, attention: str = "auto") -> Any:
    """A clone of ``model`` whose sampler calls replay CUDA graphs of the diffusion model.

    ``enable=False`` returns a clone without the wrapper (it also removes one installed upstream).
    """
    if attention not in ATTENTION_POLICIES:
        raise ValueError(f"attention policy {attention!r} is not one of {ATTENTION_POLICIES}")
    _, patcher_extension = _comfy()
    wrappers, callbacks = patcher_extension.WrappersMP, patcher_extension.CallbacksMP
    m = model.clone()
    m.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY)
    m.remove_wrappers_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY)
    for kind in (callbacks.ON_PRE_RUN, callbacks.ON_CLEANUP, callbacks.ON_DETACH):
        m.remove_callbacks_with_key(kind, WRAPPER_KEY)
    if not enable:
        return m
    runner = GraphedForward(CUDA_GRAPH_BACKEND, max_graphs=max_graphs, warmup=warmup, verify=verify,
                            tolerance=tolerance)
    state = ComfyGraphState(m.model, runner, attention)
    m.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, state.wrapper)
    m.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, state.count_model_call)
    m.add_callback_with_key(callbacks.ON_PRE_RUN, WRAPPER_KEY, state.on_pre_run)
    m.add_callback_with_key(callbacks.ON_CLEANUP, WRAPPER_KEY, state.on_cleanup)
    m.add_callback_with_key(callbacks.ON_DETACH, WRAPPER_KEY, state.on_detach)
    return m


_ATTENTION_TOOLTIP = (
    "Attention under capture. auto: PyTorch attention only, exactly as eager, except that the cuDNN "
    "attention kernel is avoided on cuDNN 9.13-9.14 (known to fault under CUDA graphs). "
    "sdpa_no_cudnn: PyTorch attention only, always without the cuDNN kernel. "
    "unchecked: capture whatever attention ComfyUI uses (xformers, sage, ...); keep verify on."
)


class FewStepCUDAGraph(io.ComfyNode):
    """MODEL -> MODEL: later sampler calls replay CUDA graphs of the diffusion model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_ID_PREFIX}CUDAGraph",
            display_name="FewStep CUDA Graph",
            category="advanced/model",
            description="Replays captured CUDA graphs of the diffusion model's forward pass, removing the "
                        "per-kernel launch overhead; images are unchanged. Calls that cannot be captured "
                        "safely (CPU, low-VRAM loading, patches, hooks) run as usual, and the log says why.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose diffusion-model calls should replay CUDA graphs."),
                io.Boolean.Input("enable", default=True, tooltip="Off passes the model through unchanged."),
                io.Int.Input("max_graphs", default=4, min=1, max=64,
                             tooltip="Cached graphs (input signatures: batch size, resolution, prompt length); "
                                     "the least recently used is freed first. Each holds one forward pass "
                                     "of activation memory."),
                io.Int.Input("warmup", default=2, min=0, max=10,
                             tooltip="Eager runs before each capture, so libraries finish their lazy set-up."),
                io.Boolean.Input("verify", default=True,
                                 tooltip="Compare the first replay of each new graph with the eager forward "
                                         "and fall back to eager if they differ beyond the tolerance."),
                io.Combo.Input("attention", options=list(ATTENTION_POLICIES), default="auto",
                               tooltip=_ATTENTION_TOOLTIP),
                io.Float.Input("tolerance", default=1e-3, min=0.0, max=1.0, step=1e-4, optional=True,
                               tooltip="Allowed max |graph - eager| relative to max |eager| when verifying."),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model with the CUDA-graph wrapper; the input is unchanged.")],
        )

    @classmethod
    def execute(cls, model, enable, max_graphs, warmup, verify, attention, tolerance=1e-3) -> io.NodeOutput:
        if attention not in ATTENTION_POLICIES:  # a wrong setting is the user's to fix, not a fallback
            raise ValueError(f"attention must be one of {list(ATTENTION_POLICIES)}, got {attention!r}")
        try:
            patched = apply_cuda_graph(model, enable=enable, max_graphs=max_graphs, warmup=warmup, verify=verify,
                                       tolerance=tolerance, attention=attention)
        except Exception:
            logger.exception("CUDA graph: could not install the wrapper; the model passes through unchanged")
            patched = model
        return io.NodeOutput(patched)
