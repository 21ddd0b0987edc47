"""CUDA-graph core on CPU: signatures, cache, invalidation, LRU, fallbacks, parity check.

The capture backend is the emulation backend, which keeps CUDA-graph semantics (replay
recomputes from the static input buffers and writes into the static outputs recorded at
capture; recorded outputs hold garbage until replayed) and counts captures, replays and
releases, so stale-buffer and invalidation bugs show up as wrong numbers, as on a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfyui_fewstep.cuda_graph import (
    CUDA_GRAPH_BACKEND,
    GraphedForward,
    ModelFacts,
    UnsupportedInput,
    flatten,
    ineligible_reason,
    parameter_fingerprint,
    pin_sdpa_backends,
    unflatten,
)
from comfyui_fewstep.cuda_graph import graphed
from comfyui_fewstep.cuda_graph.attention import sdpa_without_cudnn
from comfyui_fewstep.cuda_graph.signature import options_key
from comfyui_fewstep.cuda_graph.cache import GraphCache
from comfyui_fewstep.cuda_graph.emulate import EmulatedGraphBackend
from comfyui_fewstep.cuda_graph.verify import compare_outputs

CPU = torch.device("cpu")


class RecordingBackend(EmulatedGraphBackend):
    """The emulation backend, optionally failing its captures or replaying stale outputs."""

    def __init__(self, fail=False, stale=False):
        super().__init__()
        self.fail, self.stale = fail, stale

    def record(self, body):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = super().record(body)
        if self.stale:  # a kernel that escaped capture: the outputs are never refreshed
            graph.body = lambda: graph.output
        return graph


def unet_like(w: torch.Tensor):
    """A forward with the DIFFUSION_MODEL argument layout; pops control lists like apply_control."""

    def forward(inputs):
        x, t, ctx, y, control = (inputs[k] for k in ("x", "timesteps", "context", "y", "control"))
        h = x * w + t.view(-1, 1, 1, 1) + ctx.mean()
        if y is not None:
            h = h + y.sum()
        if control is not None:
            while control["output"]:
                c = control["output"].pop()
                if c is not None:
                    h = h + c
        return h

    return forward


def inputs(batch=2, size=4, seed=0, y=False, control=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "timesteps": torch.rand(batch, generator=g) * 999,
        "context": torch.randn(batch, 77, 8, generator=g),
        "y": torch.randn(batch, 16, generator=g) if y else None,
        "control": control,
    }


# ---------------------------------------------------------------- signatures
def test_signature_ignores_values_but_not_shapes_dtypes_structure():
    a, _ = flatten(inputs(seed=0))
    assert a == flatten(inputs(seed=1))[0]
    assert a != flatten(inputs(batch=1))[0]
    assert a != flatten(inputs(size=8))[0]
    assert a != flatten(inputs(y=True))[0]
    half = inputs()
    half["x"] = half["x"].half()
    assert a != flatten(half)[0]
    transposed = inputs()
    transposed["context"] = transposed["context"].transpose(1, 2).contiguous().transpose(1, 2)
    assert a != flatten(transposed)[0]
    with_control = inputs(control={"output": [torch.zeros(2, 4, 4, 4), None]})
    other_control = inputs(control={"output": [None, torch.zeros(2, 4, 4, 4)]})
    assert flatten(with_control)[0] != flatten(other_control)[0]
    assert flatten({"n": 3})[0] != flatten({"n": 4})[0]


def test_unflatten_round_trips_with_new_containers():
    tree = inputs(y=True, control={"output": [torch.ones(1), None], "input": []})
    spec, leaves = flatten(tree)
    rebuilt = unflatten(spec, leaves)
    assert rebuilt["control"]["output"] is not tree["control"]["output"]
    assert rebuilt["control"]["output"][1] is None and rebuilt["control"]["input"] == []
    assert all(a is b for a, b in zip(flatten(rebuilt)[1], leaves))
    with pytest.raises(ValueError, match="fewer tensors"):
        unflatten(spec, leaves[:-1])


def test_unsupported_leaf_names_its_path():
    with pytest.raises(UnsupportedInput, match=r"input\.kwargs\.hook is a function"):
        flatten({"kwargs": {"hook": lambda: None}})


def test_zero_dim_cpu_tensors_are_keyed_by_value():
    """A CUDA kernel reads a 0-dim CPU tensor's value on the host when it is launched, so a
    graph bakes it in: it joins the key by value (and is rebuilt), it is not a buffer."""
    spec_a, leaves_a = flatten({"x": torch.ones(2), "scale": torch.tensor(2.0)})
    spec_b, _ = flatten({"x": torch.ones(2), "scale": torch.tensor(3.0)})
    assert spec_a != spec_b and len(leaves_a) == 1
    rebuilt = unflatten(spec_a, leaves_a)
    assert rebuilt["scale"].dtype == torch.float32 and float(rebuilt["scale"]) == 2.0


def test_options_key_by_value_without_per_call_entries():
    base = {"cond_or_uncond": [0, 1], "uuids": ["a"], "sigmas": torch.ones(1),
            "rope_options": {"scale_y": 1.0}}
    key = options_key(base)
    assert key == options_key(dict(base, cond_or_uncond=[1], uuids=["b"], sigmas=torch.zeros(1)))
    assert key != options_key(dict(base, rope_options={"scale_y": 2.0}))
    with pytest.raises(UnsupportedInput, match="transformer_options.mask is a tensor"):
        options_key(dict(base, mask=torch.ones(2)))


class _Window:
    """Like ComfyUI's IndexListContextWindow: a new object for every window of every step."""

    def __init__(self, index_list, dim=0):
        self.index_list, self.context_length, self.dim = index_list, len(index_list), dim


def test_options_key_objects_by_content_functions_by_identity():
    """Plain objects are keyed by their attributes, not by id(): a value changed in place is another
    key (an id-keyed object replayed the old graph), a new object with the same attributes the same
    key (context windows recaptured on every call, as a freed object's id came back); functions are
    held by the key; what it cannot describe runs eagerly."""
    key = options_key({"context_window": _Window([0, 1, 2])})
    assert key == options_key({"context_window": _Window([0, 1, 2])})
    assert key != options_key({"context_window": _Window([1, 2, 3])})
    window = _Window([0, 1, 2])
    before = options_key({"context_window": window})
    window.dim = 1
    assert options_key({"context_window": window}) != before

    def patch(x):
        return x

    assert options_key({"fn": patch}) == options_key({"fn": patch})
    assert options_key({"fn": patch}) != options_key({"fn": lambda x: x})
    assert any(part is patch for part in options_key({"fn": patch})[0][1])  # alive with the key
    assert options_key({"easycache": object(), "a": 1}) == options_key({"a": 1})  # its own wrapper's state
    with pytest.raises(UnsupportedInput, match="transformer_options.marker is a object object"):
        options_key({"marker": object()})
    with pytest.raises(UnsupportedInput, match=r"transformer_options.holder.__dict__.cache is a tensor"):
        holder = _Window([0])
        holder.cache = torch.zeros(1)
        options_key({"holder": holder})
    # two classes of the same name (made at run time, or in two modules) are two keys
    twins = [type("Rope", (), {"scale": scale, "__init__": lambda self: setattr(self, "theta", 1)})
             for scale in (1.0, 2.0)]
    assert options_key({"rope": twins[0]()}) != options_key({"rope": twins[1]()})
    loop = _Window([0])
    loop.parent = loop
    with pytest.raises(UnsupportedInput, match="nests deeper than"):
        options_key({"loop": loop})


def test_parameter_fingerprint_tracks_replaced_weights_not_inplace_updates():
    lin = torch.nn.Linear(3, 3)
    before = parameter_fingerprint(lin)
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert parameter_fingerprint(lin) == before
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    assert parameter_fingerprint(lin) != before


# ---------------------------------------------------------------- replay and cache
def test_second_call_with_same_signature_replays_fresh_data():
    backend = RecordingBackend()
    gf = GraphedForward(backend, warmup=2, verify=True)
    fwd = unet_like(torch.tensor(0.5))
    first, second = inputs(seed=0), inputs(seed=1)
    out1 = gf(fwd, first, device=CPU)
    assert torch.equal(out1, fwd(inputs(seed=0)))
    assert (backend.captures, backend.warmups) == (1, 2)
    out2 = gf(fwd, second, device=CPU)
    assert backend.captures == 1 and gf.stats.replays == 2
    assert torch.equal(out2, fwd(inputs(seed=1)))
    # the returned tensor is a copy: clobbering it does not reach the next replay
    out2.fill_(123.0)
    assert torch.equal(gf(fwd, inputs(seed=2), device=CPU), fwd(inputs(seed=2)))


@pytest.mark.parametrize("verify", [False, True])
def test_first_replay_reads_the_callers_inputs_after_warm_ups_wrote_to_them(verify):
    """A forward that writes to its input (in place) runs several times on the static buffers while
    warming up and recording; the first replay still starts from the caller's values."""
    backend = RecordingBackend()
    gf = GraphedForward(backend, warmup=2, verify=verify)

    def halve_in_place(t):
        return t["x"].mul_(0.5).clone()

    out = gf(halve_in_place, {"x": torch.ones(2)}, device=CPU)
    assert torch.equal(out, torch.full((2,), 0.5))
    assert gf.stats.verify_failures == 0 and len(gf.cache) == 1
    assert torch.equal(gf(halve_in_place, {"x": torch.full((2,), 4.0)}, device=CPU), torch.full((2,), 2.0))


def test_a_model_call_inside_a_capture_runs_eagerly_as_part_of_it():
    """A forward that calls another wrapped model (a patch running a second model): the inner call
    runs eagerly while the outer one warms up and records, instead of waiting for the capture lock
    its own thread holds (a hang on CUDA), and the outer graph replays both."""
    backend = RecordingBackend()
    outer, inner = GraphedForward(backend, warmup=1, verify=True), GraphedForward(backend, warmup=1)

    def inner_forward(t):
        return t["x"] * 3.0

    def outer_forward(t):
        return inner(inner_forward, {"x": t["x"] + 1.0}, device=CPU) * 2.0

    for value in (1.0, 2.0):
        out = outer(outer_forward, {"x": torch.full((2,), value)}, device=CPU)
        assert torch.equal(out, torch.full((2,), (value + 1.0) * 6.0))
    assert outer.stats.captures == 1 and inner.stats.eager_calls[graphed.NESTED_REASON] >= 2


def test_cuda_capture_reports_the_bodys_error_not_the_capture_end(monkeypatch):
    """torch.cuda.graph's exit ends the capture even after the body failed, and that raises its own
    error, which used to replace the real cause in the log (e.g. a .item() during capture)."""
    import contextlib

    from comfyui_fewstep.cuda_graph.capture import CudaGraphBackend

    class Dummy:
        def __getattr__(self, name):
            return lambda *a, **k: None

    @contextlib.contextmanager
    def graph_context(*args, **kwargs):
        yield
        raise RuntimeError("operation failed due to a previous error during capture")

    for name, value in {"device": lambda d: contextlib.nullcontext(), "stream": lambda s: contextlib.nullcontext(),
                        "synchronize": lambda d=None: None, "mem_get_info": lambda d=None: (0, 0),
                        "CUDAGraph": Dummy, "graph": graph_context, "current_stream": lambda d=None: Dummy(),
                        "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    backend = CudaGraphBackend()
    monkeypatch.setattr(backend, "_stream", lambda device: Dummy())

    def body():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing") as info:
        backend.capture(body, device=torch.device("cuda", 0), warmup=0, pool=None)
    assert "previous error during capture" in str(info.value.__cause__)


def test_new_signature_captures_again():
    backend = RecordingBackend()
    gf = GraphedForward(backend)
    fwd = unet_like(torch.tensor(2.0))
    gf(fwd, inputs(batch=2), device=CPU)
    out = gf(fwd, inputs(batch=1), device=CPU)  # cfg batching changed mid-run
    assert backend.captures == 2 and len(gf.cache) == 2
    assert torch.equal(out, fwd(inputs(batch=1)))


def test_key_extra_separates_graphs():
    backend = RecordingBackend()
    gf = GraphedForward(backend)
    fwd = unet_like(torch.tensor(2.0))
    gf(fwd, inputs(), device=CPU, key_extra=(1, 0))
    gf(fwd, inputs(), device=CPU, key_extra=(0, 1))
    gf(fwd, inputs(), device=CPU, key_extra=(1, 0))
    assert backend.captures == 2


def test_weight_change_releases_graphs_and_recaptures_with_new_weights():
    backend = RecordingBackend()
    gf = GraphedForward(backend)
    w = torch.tensor(1.0)
    fwd = unet_like(w)
    gf(fwd, inputs(), device=CPU, weights=("uuid-a", 1))
    gf(fwd, inputs(), device=CPU, weights=("uuid-a", 1))
    assert backend.captures == 1
    fwd_b = unet_like(torch.tensor(3.0))  # a LoRA replaced the weights
    out = gf(fwd_b, inputs(seed=5), device=CPU, weights=("uuid-b", 1))
    assert backend.captures == 2 and backend.releases == 1 and gf.stats.invalidations == 1
    assert backend.graphs[0].released and not backend.graphs[1].released
    assert torch.equal(out, fwd_b(inputs(seed=5)))


def test_lru_evicts_least_recently_used():
    backend = RecordingBackend()
    gf = GraphedForward(backend, max_graphs=2)
    fwd = unet_like(torch.tensor(1.5))
    a, b, c = ({"batch": 1}, {"batch": 2}, {"batch": 3})
    gf(fwd, inputs(**a), device=CPU)
    gf(fwd, inputs(**b), device=CPU)
    gf(fwd, inputs(**a), device=CPU)  # a is now the most recently used
    gf(fwd, inputs(**c), device=CPU)  # evicts b
    assert backend.captures == 3 and backend.releases == 1 and backend.graphs[1].released
    gf(fwd, inputs(**a), device=CPU)
    assert backend.captures == 3  # a survived
    gf(fwd, inputs(**b), device=CPU)
    assert backend.captures == 4 and len(gf.cache) == 2
    assert backend.pools == 1  # one memory pool per model


def test_cache_rejects_bad_size():
    with pytest.raises(ValueError, match="max_entries"):
        GraphCache(0)


# ---------------------------------------------------------------- fallbacks
def test_blocked_call_is_eager_and_logged_once(caplog):
    backend = RecordingBackend()
    gf = GraphedForward(backend)
    fwd = unet_like(torch.tensor(0.25))
    with caplog.at_level(logging.INFO, logger="comfyui_fewstep.cuda_graph.graphed"):
        for seed in range(3):
            out = gf(fwd, inputs(seed=seed), device=CPU, blocked="the model is partially loaded")
            assert torch.equal(out, fwd(inputs(seed=seed)))
    records = [r for r in caplog.records if "partially loaded" in r.getMessage()]
    assert len(records) == 1 and backend.captures == 0
    gf(fwd, inputs(), device=CPU)  # the next eligible call uses graphs again
    assert backend.captures == 1


def test_unavailable_backend_on_cpu_gives_a_reason():
    reason = CUDA_GRAPH_BACKEND.unavailable_reason(CPU)
    assert "CUDA device" in reason
    gf = GraphedForward(CUDA_GRAPH_BACKEND)
    fwd = unet_like(torch.tensor(1.0))
    assert torch.equal(gf(fwd, inputs(), device=CPU), fwd(inputs()))
    assert gf.stats.eager_calls[reason] == 1


def test_capture_failure_runs_eager_frees_and_is_not_retried(caplog):
    backend = RecordingBackend(fail=True)
    gf = GraphedForward(backend)
    fwd = unet_like(torch.tensor(1.0))
    with caplog.at_level(logging.INFO):
        for seed in range(3):
            assert torch.equal(gf(fwd, inputs(seed=seed), device=CPU), fwd(inputs(seed=seed)))
    assert backend.warmups == 2  # one attempt only; the signature is negative-cached
    assert len(gf.cache) == 0 and gf.stats.capture_failures == 1
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1
    gf(fwd, inputs(), device=CPU, weights="new weights")  # a weight change forgets failures
    assert backend.warmups == 4


def test_a_capture_that_ran_out_of_memory_tries_again_next_run(caplog):
    """Out of memory is a state of the device, not of the forward: the signature runs eagerly for
    the rest of the run and captures again in the next one (other failures stay eager)."""
    class OnceOutOfMemory(RecordingBackend):
        def record(self, body):
            if self.captures == 0 and not getattr(self, "failed_once", False):
                self.failed_once = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().record(body)

    backend = OnceOutOfMemory()
    gf = GraphedForward(backend, warmup=0)
    fwd = unet_like(torch.tensor(0.5))
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(gf(fwd, inputs(), device=CPU), fwd(inputs()))
    assert len(gf.cache) == 0 and "runs eagerly until the next run" in caplog.text
    gf.new_run()
    assert torch.equal(gf(fwd, inputs(), device=CPU), fwd(inputs()))
    assert len(gf.cache) == 1 and gf.stats.captures == 1


def test_stale_replay_is_caught_by_verification():
    backend = RecordingBackend(stale=True)
    gf = GraphedForward(backend, verify=True)
    fwd = unet_like(torch.tensor(1.0))
    out = gf(fwd, inputs(seed=3), device=CPU)
    assert torch.equal(out, fwd(inputs(seed=3)))
    assert gf.stats.verify_failures == 1 and len(gf.cache) == 0 and backend.releases == 1
    gf(fwd, inputs(seed=4), device=CPU)
    assert backend.captures == 1  # not retried


def test_unsupported_input_falls_back():
    backend = RecordingBackend()
    gf = GraphedForward(backend)

    def fwd(tree):
        return tree["x"] * 2

    tree = {"x": torch.ones(2), "callback": print}
    assert torch.equal(gf(fwd, tree, device=CPU), torch.full((2,), 2.0))
    assert backend.captures == 0 and "callback" in next(iter(gf.stats.eager_calls))


@pytest.mark.parametrize("verify", [True, False])
def test_control_lists_are_consumed_as_eager_would(verify):
    backend = RecordingBackend()
    gf = GraphedForward(backend, verify=verify)
    fwd = unet_like(torch.tensor(1.0))

    def control(seed):
        g = torch.Generator().manual_seed(seed)
        return {"output": [torch.randn(2, 4, 4, 4, generator=g), None, torch.randn(2, 4, 4, 4, generator=g)]}

    for seed in range(3):
        caller = inputs(seed=seed, control=control(seed))
        out = gf(fwd, caller, device=CPU)
        assert torch.equal(out, fwd(inputs(seed=seed, control=control(seed))))
        assert caller["control"]["output"] == []
    assert backend.captures == 1


def test_failed_replay_leaves_the_control_lists_to_the_eager_fallback(caplog):
    """A replay that fails after the graph ran (out of memory cloning its outputs) falls back to
    eager with the ControlNet residuals still there, as the caller passed them."""
    backend = RecordingBackend()
    gf = GraphedForward(backend, verify=False)
    fwd = unet_like(torch.tensor(1.0))

    def control():
        return {"output": [torch.full((2, 4, 4, 4), 10.0)]}

    gf(fwd, inputs(control=control()), device=CPU)  # capture
    entry = next(iter(gf.cache._entries.values()))

    class FailingClone(torch.Tensor):
        def clone(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    entry.static_outputs = [t.as_subclass(FailingClone) for t in entry.static_outputs]
    caller = inputs(seed=1, control=control())
    with caplog.at_level(logging.WARNING):
        out = gf(fwd, caller, device=CPU)
    assert torch.equal(out, fwd(inputs(seed=1, control=control())))  # the residual is in
    assert caller["control"]["output"] == [] and "replay failed" in caplog.text


# ---------------------------------------------------------------- eligibility, parity, attention
@pytest.mark.parametrize(
    ("facts", "needle"),
    [
        (ModelFacts("cuda", backend_reason="no CUDA"), "no CUDA"),
        (ModelFacts("cuda", grad_enabled=True), "gradients"),
        (ModelFacts("cuda", lowvram=True), "partially loaded"),
        (ModelFacts("cuda", lowvram_patches=3), "partially loaded"),
        (ModelFacts("cuda", loaded_bytes=10, model_bytes=20), "10 of 20 bytes"),
        (ModelFacts("cuda", weight_hooks=True), "hooks"),
        (ModelFacts("cuda", patches=("output_block_patch",)), "output_block_patch"),
        (ModelFacts("cuda", patches_replace=("attn2",)), "attn2"),
        (ModelFacts("cuda", attention_override=True), "override"),
        (ModelFacts("cuda", inner_wrappers=1), "wrapper"),
        (ModelFacts("cuda", attention_name="attention_sage"), "attention_sage"),
    ],
)
def test_ineligible_reasons(facts, needle):
    assert needle in ineligible_reason(facts)


def test_eligible_cases():
    assert ineligible_reason(ModelFacts("cuda", loaded_bytes=20, model_bytes=20)) is None
    assert ineligible_reason(ModelFacts("cuda", attention_name="attention_sage", attention_policy="unchecked")) is None
    allowed = ModelFacts("cuda", patches=("p",), allowed_patches=frozenset({"p"}))
    assert ineligible_reason(allowed) is None


def test_sdpa_pinning_policy():
    assert pin_sdpa_backends("sdpa_no_cudnn", None)
    assert pin_sdpa_backends("auto", 91300) and pin_sdpa_backends("auto", 91400)
    assert not pin_sdpa_backends("auto", 91200) and not pin_sdpa_backends("auto", 91500)
    assert not pin_sdpa_backends("unchecked", 91300)
    with pytest.raises(ValueError, match="attention policy"):
        pin_sdpa_backends("flash", None)


def test_compare_outputs():
    a = torch.tensor([1.0, -2.0, 4.0])
    assert compare_outputs([a], [a.clone()], 0.0).ok
    assert compare_outputs([a + 1e-4], [a], 1e-3).ok  # 1e-4 <= 1e-3 * 4
    bad = compare_outputs([a + 1e-2], [a], 1e-3)
    assert not bad.ok and abs(bad.max_abs_error - 1e-2) < 1e-6
    nan = a.clone()
    nan[0] = float("nan")
    assert not compare_outputs([nan], [a], 1.0).ok
    assert compare_outputs([nan], [nan.clone()], 0.0).ok
    assert not compare_outputs([a], [a.half()], 1.0).ok
    assert not compare_outputs([a], [], 1.0).ok


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_sdpa_without_cudnn_matches_softmax_attention(skip_reshape):
    g = torch.Generator().manual_seed(0)
    b, n, m, heads, d = 2, 5, 7, 3, 4
    q, k, v = torch.randn(b, heads, n, d, generator=g), torch.randn(b, heads, m, d, generator=g), torch.randn(
        b, heads, m, d, generator=g
    )
    mask = torch.randn(n, m, generator=g)
    ref = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask, dim=-1) @ v  # (b, heads, n, d)
    if skip_reshape:
        out = sdpa_without_cudnn(None, q, k, v, heads, mask=mask, skip_reshape=True, skip_output_reshape=True)
        torch.testing.assert_close(out, ref)
    else:
        flat = [t.transpose(1, 2).reshape(b, -1, heads * d) for t in (q, k, v)]
        out = sdpa_without_cudnn(None, *flat, heads, mask=mask)
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, n, heads * d))
