"""Input signatures: what a captured CUDA graph depends on, as a hashable key.

A CUDA graph replays fixed kernels on fixed addresses, so a graph is only valid for inputs of
the same *signature*: for every tensor its shape, dtype, device and strides; the nesting of
dicts, lists and tuples around them (which entries are ``None``); and the value of every
Python scalar, because scalars steer control flow on the host (NVIDIA CUDA Graphs guide,
"Constraints"; the same rule drives stable-fast's ``make_dynamic_graphed_callable``).
Tensor *values* are not part of the key: they are copied into static buffers before replay.

``flatten`` splits an input tree into that key plus the list of tensor leaves; ``unflatten``
rebuilds the tree around other leaves (the static buffers) in the same order.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Hashable, Iterator
from typing import Any, NamedTuple

import torch

__all__ = [
    "MAX_OPTION_DEPTH",
    "TensorMeta",
    "UnsupportedInput",
    "flatten",
    "list_lengths",
    "lists_in",
    "options_key",
    "parameter_fingerprint",
    "unflatten",
    "VOLATILE_OPTIONS",
]

_SCALARS = (bool, int, float, str, bytes, type(None))


class UnsupportedInput(TypeError):
    """An input leaf that a graph signature cannot describe (the call must run eagerly)."""


class TensorMeta(NamedTuple):
    """Everything about a tensor that a captured graph bakes in, except its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(t.shape), t.dtype, str(t.device), tuple(t.stride()))


def flatten(tree: Any, path: str = "input") -> tuple[Hashable, list[torch.Tensor]]:
    """Split ``tree`` into ``(spec, leaves)``.

    ``spec`` is a hashable description of the tree (tensors become their ``TensorMeta``,
    scalars stay by value); ``leaves`` are the tensors in depth-first order. Dicts keep
    their insertion order. Raises ``UnsupportedInput`` naming the offending path for any
    leaf that is neither a tensor, a container nor a plain scalar.
    """
    leaves: list[torch.Tensor] = []
    spec = _flatten(tree, leaves, path)
    return spec, leaves


def _flatten(node: Any, leaves: list[torch.Tensor], path: str) -> Hashable:
    if isinstance(node, torch.Tensor):
        if node.dim() == 0 and node.device.type == "cpu":
            # a CUDA kernel reads a 0-dim CPU tensor's value on the host at launch: a graph bakes
            # it in, so it is part of the key by value and rebuilt, not copied into a buffer
            return ("S", str(node.dtype), node.item())
        leaves.append(node)
        return ("T", TensorMeta.of(node))
    if isinstance(node, dict):
        return ("D", tuple((k, _flatten(v, leaves, f"{path}.{k}")) for k, v in node.items()))
    if isinstance(node, list):
        return ("L", tuple(_flatten(v, leaves, f"{path}[{i}]") for i, v in enumerate(node)))
    if isinstance(node, tuple):
        return ("U", tuple(_flatten(v, leaves, f"{path}[{i}]") for i, v in enumerate(node)))
    if isinstance(node, _SCALARS):
        return ("V", type(node).__name__, node)
    if isinstance(node, (torch.dtype, torch.device)):
        return ("V", type(node).__name__, str(node))
    raise UnsupportedInput(f"{path} is a {type(node).__name__}, which a CUDA-graph signature cannot describe")


def unflatten(spec: Hashable, leaves: list[torch.Tensor]) -> Any:
    """Rebuild the tree described by ``spec`` with ``leaves`` in place of its tensors.

    Containers are always new objects, so a forward that mutates them (ComfyUI's
    ``apply_control`` pops from the control lists) never touches the caller's tree.
    """
    it = iter(leaves)
    tree = _unflatten(spec, it)
    if next(it, None) is not None:
        raise ValueError("unflatten got more tensors than the signature describes")
    return tree


def _unflatten(spec: Any, it: Iterator[torch.Tensor]) -> Any:
    tag = spec[0]
    if tag == "T":
        try:
            return next(it)
        except StopIteration:
            raise ValueError("unflatten got fewer tensors than the signature describes") from None
    if tag == "D":
        return {k: _unflatten(v, it) for k, v in spec[1]}
    if tag == "L":
        return [_unflatten(v, it) for v in spec[1]]
    if tag == "U":
        return tuple(_unflatten(v, it) for v in spec[1])
    if tag == "S":
        return torch.tensor(spec[2], dtype=getattr(torch, spec[1].removeprefix("torch.")))
    if tag == "V":
        if spec[1] == "dtype":
            return getattr(torch, spec[2].removeprefix("torch."))
        if spec[1] == "device":
            return torch.device(spec[2])
        return spec[2]
    raise ValueError(f"not a signature node: {spec!r}")


#: ``transformer_options`` entries left out of :func:`options_key`: set anew for every call
#: without changing the recorded work (``sigmas``, ``uuids``), keyed separately
#: (``cond_or_uncond``), or sending the call down the eager path anyway (patches, wrappers,
#: callbacks, an attention override)
VOLATILE_OPTIONS = frozenset({
    "cond_or_uncond", "uuids", "sigmas", "sample_sigmas", "wrappers", "callbacks", "patches",
    "patches_replace", "optimized_attention_override",
    # EasyCache's state: read by its own diffusion-model wrapper, which runs either outside this
    # one (the forward never sees it) or inside it (the call then runs eagerly)
    "easycache",
})

#: how deep :func:`options_key` follows plain objects' attributes before giving up (eager)
MAX_OPTION_DEPTH = 8


def options_key(options: Any, skip: frozenset[str] = VOLATILE_OPTIONS) -> Hashable:
    """A hashable description of the host-side options a forward reads (ComfyUI's
    ``transformer_options``): a captured graph bakes in whatever the forward decided from them
    (``rope_options``, ``chroma_radiance_options``, a context window's frame indices), so they
    join the key. Scalars count by value, containers by their items, plain objects by their type
    and attributes (a new object with the same attributes is the same key; an attribute changed in
    place is another), functions and classes by the object itself (held by the key, so its id is
    never reused). Raises :class:`UnsupportedInput` for anything else the key cannot describe (a
    tensor, an object without attributes, nesting deeper than :data:`MAX_OPTION_DEPTH`): a graph
    would keep reading what it captured."""
    if not isinstance(options, dict):
        return _option_value(options, "transformer_options", 0)
    return tuple((str(k), _option_value(v, f"transformer_options.{k}", 0))
                 for k, v in options.items() if k not in skip)


def _option_value(value: Any, path: str, depth: int) -> Hashable:
    if depth > MAX_OPTION_DEPTH:
        raise UnsupportedInput(f"{path} nests deeper than {MAX_OPTION_DEPTH} levels")
    if isinstance(value, torch.Tensor):
        raise UnsupportedInput(f"{path} is a tensor, which a captured graph would not refresh")
    if isinstance(value, _SCALARS):
        return ("V", type(value).__name__, value)
    if isinstance(value, dict):
        return ("D", tuple((str(k), _option_value(v, f"{path}.{k}", depth + 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("L", tuple(_option_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)))
    if isinstance(value, (torch.dtype, torch.device)):
        return ("V", type(value).__name__, str(value))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                          types.ModuleType, functools.partial)):
        return ("F", value)  # held by the key: compared by identity, and alive while the graph is
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        return ("O", type(value),  # the class itself: two classes may share a name
                _option_value(attributes, f"{path}.__dict__", depth + 1))
    raise UnsupportedInput(f"{path} is a {type(value).__qualname__} object, which the graph key cannot "
                           "describe")


def list_lengths(tree: Any) -> list[int]:
    """Lengths of every list in ``tree``, depth-first (the order of ``lists_in``)."""
    return [len(lst) for lst in lists_in(tree)]


def lists_in(tree: Any) -> list[list]:
    """The list objects in ``tree``, in the order of ``list_lengths``."""
    out: list[list] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            out.append(node)
            for v in node:
                visit(v)
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, tuple):
            for v in node:
                visit(v)

    visit(tree)
    return out


def parameter_fingerprint(module: torch.nn.Module) -> int:
    """Hash of where every parameter and buffer of ``module`` lives (address, dtype, shape).

    A graph reads weights through the addresses it was captured with; any weight that was
    replaced by a new tensor (a LoRA applied with a new ``Parameter``, a reload, a move to
    another device) changes this fingerprint, which must then drop the graphs. In-place
    updates keep it, by design: the graph sees them.
    """
    items = []
    for t in list(module.parameters()) + list(module.buffers()):
        items.append((t.data_ptr(), t.dtype, tuple(t.shape), t.device.type))
    return hash(tuple(items))
