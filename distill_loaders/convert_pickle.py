"""``python -m comfyui_fewstep convert FILE.pkl [-o OUT]``: pickle -> safetensors + JSON, no code run.

Published students such as SiD (EDM ``network-snapshot-*.pkl``, whose classes carry their own
source code) and SiD-LSG (a pickled diffusers UNet) can only be opened with ``pickle.load``, which
executes whatever the file asks for. This converter uses a *restricted* unpickler instead:

* tensors and storages are rebuilt with torch's own rebuild functions, storages from embedded bytes
  only through ``torch.load(weights_only=True)``;
* plain containers (dict, OrderedDict, list, tuple, set) and scalars are rebuilt as usual;
* objects of model classes (``torch.nn.*``, EDM's ``torch_utils``/``training``/``dnnlib``,
  ``diffusers.*``) become inert :class:`Stub` records of their class *name* and state — the class is
  never imported and none of its code runs;
* **every other global is refused** (``os.system``, ``builtins.eval``, ``subprocess``...) with
  :class:`~.errors.UnsafePickleError`;
* a tensor view must lie inside the storage the pickle gave it (torch would otherwise grow the
  storage with uninitialised memory), and BUILD can change neither the functions the pickle calls
  nor the tensors it built;
* a container shared many times over, or inside itself, is walked once; every other failure of a
  damaged or crafted file is a :class:`~.errors.StudentLoadError` that names it.

The stubs are then walked like ``nn.Module.state_dict()`` to collect named tensors, and the class
names and constructor arguments (EDM's ``init_kwargs``, diffusers' config) go to a JSON file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import pickletools
import re
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from .edm_networks import strip_precond_prefix
from .errors import StudentLoadError, UnsafePickleError, unreadable
from .safetensors_header import is_torch_save_file
from .specs import RECIPES

logger = logging.getLogger(__name__)

__all__ = ["RestrictedUnpickler", "Stub", "convert", "extract_state_dict", "main", "restricted_load"]

#: values written to a config's JSON at most (real configs have a few hundred)
JSON_NODES = 100_000

STUB_MODULE_PREFIXES = (
    "torch.nn.modules.",
    "torch.nn.parameter",
    "torch_utils.",
    "training.",
    "dnnlib.",
    "diffusers.",
    "networks",
    "edm_networks",
)


def _load_storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(None, "the pickle rebuilds a parameter from something that is not a tensor.",
                                "this file cannot be converted safely.")
    return data.detach()


def _refuse_view(problem: str):
    return UnsafePickleError(None, f"the pickle builds a tensor view {problem}.",
                             "the file is damaged or crafted; it cannot be converted.")


def _checked_view(storage, storage_offset, size, stride) -> None:
    """Refuse a tensor view that does not lie inside its storage: torch would grow the storage and
    the output would carry whatever memory it got (or a broadcast view would expand without bound)."""
    if not isinstance(storage, torch.storage.TypedStorage):  # what torch.save writes for a tensor
        raise _refuse_view(f"on a {type(storage).__name__}, not a storage")
    dims = (tuple(size), tuple(stride))
    if len(dims[0]) != len(dims[1]) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in (storage_offset, *dims[0], *dims[1])):
        raise _refuse_view(f"with size {list(size)}, stride {list(stride)} and offset {storage_offset!r}")
    numel = 1
    for n in dims[0]:
        numel *= n
    with warnings.catch_warnings():  # TypedStorage's getters warn that the class is deprecated
        warnings.simplefilter("ignore")
        available = storage.size()
    if numel == 0:
        return
    last = storage_offset + sum((n - 1) * s for n, s in zip(*dims))
    if last >= available or numel > available:
        raise _refuse_view(f"of {numel} elements ending at element {last} of a storage of {available}")


class _BuiltTensor(torch.Tensor):
    """A tensor as the pickle built it, which a later BUILD cannot re-point: ``Tensor.__setstate__``
    would ``set_`` it onto a larger view of its storage, which torch grows with uninitialised
    memory."""

    def __setstate__(self, state):
        raise UnsafePickleError(None, "the pickle tries to change a tensor after building it (BUILD on a "
                                "tensor).", "the file is crafted; it cannot be converted.")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    _checked_view(storage, storage_offset, size, stride)
    built = torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *rest)
    return built.as_subclass(_BuiltTensor)


def _rebuild_tensor(storage, storage_offset, size, stride):
    _checked_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride).as_subclass(_BuiltTensor)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A contiguous plain tensor of ``t``'s values (the output file's copy)."""
    return t.detach().as_subclass(torch.Tensor).contiguous()


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(str, 'latin1')``; only text codecs pass."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(
            None,
            f"the pickle calls _codecs.encode with {encoding!r}.",
            "this file cannot be converted safely.",
        )
    return text.encode(encoding)


class _NumpyDType:
    """Inert record of a pickled ``numpy.dtype(code, align, copy)``; BUILD passes its byte order."""

    def __init__(self, code, align=False, copy=False):
        if not isinstance(code, str):
            raise UnsafePickleError(
                None,
                f"the pickle builds a numpy dtype from {code!r}.",
                "this file cannot be converted safely.",
            )
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.order = state[1]


def _numpy_scalar(dtype, data=None):
    """A pickled numpy scalar (EDM keeps ``skip_scale = np.sqrt(0.5)`` in its modules) as a Python
    number, decoded from its bytes; object and structured dtypes are refused."""
    import numpy as np

    numeric = re.fullmatch(r"[?bBhHiIlLqQefdgFDG]|[biufc]\d+", getattr(dtype, "code", ""))
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) or not numeric:
        raise UnsafePickleError(
            None,
            "the pickle holds a numpy scalar of an object or unknown type.",
            "this file cannot be converted safely.",
        )
    dt = np.dtype(dtype.code).newbyteorder(dtype.order if dtype.order != "|" else "=")
    return np.frombuffer(data, dtype=dt, count=1)[0].item()


_SAFE_GLOBALS = {
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
}
for _np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x names
    _SAFE_GLOBALS[(_np_core, "scalar")] = _numpy_scalar
_SAFE_GLOBALS[("numpy", "dtype")] = _NumpyDType
for _dt in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"):
    _SAFE_GLOBALS[("torch", _dt)] = getattr(torch, _dt)


class Stub:
    """Inert stand-in for an object of a model class: records the class name, the arguments it was
    built with and its state. Nothing of the real class is imported or run."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls __new__ only
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"Stub({self.qualname})"


class _Call:
    """A function the pickle may call, behind a wrapper that BUILD cannot change. BUILD on a plain
    function would set its ``__defaults__`` or attributes for the rest of the process (torch's own
    rebuild functions included)."""

    __slots__ = ("function",)

    def __init__(self, function) -> None:
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __setstate__(self, state):
        raise UnsafePickleError(None, "the pickle tries to change a function it calls (BUILD on a global).",
                                "the file is crafted; it cannot be converted.")


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` without calling ``base.__new__`` on a real class."""
    obj = cls() if isinstance(cls, type) and issubclass(cls, Stub) else Stub()
    if state is not None:
        obj.state = state
    return obj


def _newobj(cls, *args):
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickleError(
            None,
            f"the pickle builds an object of {cls!r} outside the allowed model classes.",
            "this file cannot be converted safely.",
        )
    return cls(*args)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds tensors, plain containers and inert :class:`Stub` records."""

    def __init__(self, file, path: str | None = None):
        super().__init__(file)
        self.path = path
        self.refused: list[str] = []
        # classes of this load only: a BUILD on one of them cannot reach another load
        self._stubs: dict[str, type] = {}
        self._numpy_dtype = type("NumpyDType", (_NumpyDType,), {})

    def _stub_class(self, module: str, name: str) -> type:
        qual = f"{module}.{name}"
        if qual not in self._stubs:
            self._stubs[qual] = type(f"Stub_{name}", (Stub,), {"qualname": qual})
        return self._stubs[qual]

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol <= 2 names
        if (module, name) in _SAFE_GLOBALS:
            found = _SAFE_GLOBALS[(module, name)]
            if found is _NumpyDType:
                return self._numpy_dtype
            return _Call(found) if isinstance(found, types.FunctionType) else found
        if module == "copyreg" and name == "_reconstructor":
            return _Call(_reconstructor)
        if module == "copyreg" and name == "__newobj__":
            return _Call(_newobj)
        if module.startswith(STUB_MODULE_PREFIXES) or module in ("torch_utils", "training", "dnnlib"):
            return self._stub_class(module, name)
        self.refused.append(f"{module}.{name}")
        raise UnsafePickleError(
            self.path,
            f"the pickle asks to call {module}.{name}, which is not a tensor, container or model class; "
            "nothing was run.",
            "this file may be malicious or of an unknown kind; do not load it with pickle.",
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(
            self.path,
            "the pickle uses persistent ids (a torch.save file).",
            "load it with torch.load(weights_only=True) or the loader node instead.",
        )


#: memo slots a pickle may ask for: CPython's unpickler zero-fills the memo up to the largest
#: index it is given (an 11-byte pickle can ask for 1.3 GB); real model pickles use thousands
MAX_MEMO_INDEX = 10_000_000


def _check_memo(f, path: Path) -> None:
    """Refuse a memo index far beyond any real pickle's before the unpickler allocates for it
    (the opcodes are read, not run; a stream pickletools cannot parse is left to the unpickler)."""
    try:
        for op, arg, _ in pickletools.genops(f):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > MAX_MEMO_INDEX:
                raise UnsafePickleError(path, f"the pickle asks for memo slot {arg:,}.",
                                        "the file is crafted or damaged; it cannot be converted.")
    except UnsafePickleError:
        raise
    except Exception:  # noqa: BLE001, S110 - the unpickler reports a damaged stream itself
        pass
    finally:
        f.seek(0)


def _torch_save_file(path: Path) -> StudentLoadError:
    return StudentLoadError(
        path,
        "this is a torch.save file (a state dict), not a plain pickle: it needs no conversion.",
        "pick it in the loader node directly; it is read there with torch.load(weights_only=True).",
    )


def restricted_load(path: str | Path):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (a torch.save file is refused: the
    loaders read it directly)."""
    path = Path(path)
    if path.is_file() and is_torch_save_file(path):
        raise _torch_save_file(path)
    with open(path, "rb") as f:
        _check_memo(f, path)
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError as e:
            if e.path is None:
                raise UnsafePickleError(path, e.problem, e.hint) from None
            raise
        except StudentLoadError:
            raise
        except (MemoryError, OverflowError, RecursionError) as e:
            raise StudentLoadError(
                path,
                f"the pickle asks for more than it can hold ({type(e).__name__}: {str(e)[:200]}).",
                "the file is damaged or crafted; it cannot be converted.",
            ) from None
        except Exception as e:  # noqa: BLE001 - any other failure of a damaged pickle is a load error
            raise StudentLoadError(
                path,
                f"the pickle cannot be read ({type(e).__name__}: {str(e)[:200]}).",
                "the file is truncated or not a model pickle; download it again.",
            ) from None


def _state_of(stub: Stub) -> dict:
    state = stub.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
        state = {**(state[0] or {}), **state[1]}
    if state is None and stub.args and isinstance(stub.args[0], dict):  # persistence: _reconstruct(meta)
        meta = stub.args[0]
        state = meta.get("state") if isinstance(meta.get("state"), dict) else meta
    return state if isinstance(state, dict) else {}


def extract_state_dict(
    obj, prefix: str = "", config: dict | None = None, seen: set[int] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten tensors from an unpickled tree into ``{dotted.name: tensor}`` (``nn.Module.state_dict``
    naming for module stubs) and collect a JSON-able config of the classes met. Each container is
    walked once (``seen``): a pickle that shares or nests a container in itself cannot make the
    walk exponential or endless."""
    out: dict[str, torch.Tensor] = {}
    config = {} if config is None else config
    seen = set() if seen is None else seen
    if not isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return out, config
        seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = _plain(obj)
    elif isinstance(obj, Stub):
        state = _state_of(obj)
        name = obj.qualname
        if obj.args and isinstance(obj.args[0], dict) and "class_name" in obj.args[0]:
            name = f"{obj.args[0].get('module_src', '') and 'persistent:'}{obj.args[0]['class_name']}"
        entry = {"class": name}
        for key in ("_init_kwargs", "init_kwargs", "_internal_dict"):
            value = state.get(key)
            if isinstance(value, Stub):
                value = dict(value.items) or _state_of(value)
            if isinstance(value, dict):
                entry["init_kwargs"] = _jsonable(value)
        config[prefix.rstrip(".") or "<root>"] = entry
        if "_parameters" in state or "_buffers" in state or "_modules" in state:
            for group in ("_parameters", "_buffers"):
                for k, v in _items(state.get(group)):
                    if isinstance(v, torch.Tensor):
                        out[prefix + k] = _plain(v)
            for k, v in _items(state.get("_modules")):
                if v is not None:
                    sub, _ = extract_state_dict(v, f"{prefix}{k}.", config, seen)
                    out.update(sub)
        else:
            for k, v in state.items():
                if isinstance(v, (torch.Tensor, Stub, dict, list, tuple)) and not str(k).startswith("_"):
                    sub, _ = extract_state_dict(v, f"{prefix}{k}.", config, seen)
                    out.update(sub)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            sub, _ = extract_state_dict(v, f"{prefix}{k}.", config, seen)
            out.update(sub)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            sub, _ = extract_state_dict(v, f"{prefix}{i}.", config, seen)
            out.update(sub)
    return out, config


def _items(value):
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, Stub):
        return list(value.items.items())
    return []


def _jsonable(value, active: frozenset[int] = frozenset(), budget: list[int] | None = None):
    """Plain JSON for a config value; at most :data:`JSON_NODES` values in all (a pickle can share
    one list many times over), a container inside itself written as ``"<cycle>"``."""
    budget = [JSON_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return "<truncated>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if id(value) in active:
        return "<cycle>"
    inner = active | {id(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v, inner, budget) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, inner, budget) for v in value]
    if isinstance(value, Stub):
        items = {"items": _jsonable(value.items, inner, budget)} if value.items else {}
        return {"class": value.qualname, **items}
    return repr(value)[:200]


def _check_outputs(src: Path, dst: Path, force: bool) -> None:
    """Refuse, before any work, outputs that would destroy the input or each other, or an existing file."""
    cfg = dst.with_suffix(".json")
    if dst.suffix == ".json":
        raise StudentLoadError(dst, "the output would be overwritten by its own .json config.",
                               "give an output name ending in .safetensors.")
    if any(p.exists() and p.resolve() == src.resolve() for p in (dst, cfg)):
        raise StudentLoadError(src, "the output would overwrite the input pickle.",
                               "give another output name with -o.")
    if not dst.parent.is_dir():
        raise StudentLoadError(dst, f"the output folder {dst.parent} does not exist.", "create it first.")
    existing = [str(p) for p in (dst, cfg) if p.exists()]
    if existing and not force:
        raise StudentLoadError(dst, f"{' and '.join(existing)} already exist(s).",
                               "pass --force to replace, or give another name with -o.")


def _readable_by_all(path: Path) -> None:
    """The mode a new file gets from the umask (safetensors writes 0600 through a temporary file),
    so that ComfyUI running as another user can read the converted model."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def convert(
    src: str | Path, dst: str | Path | None = None, key: str | None = None, recipe: str | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Convert a pickle to ``dst`` (.safetensors) and ``dst`` with ``.json``; returns both paths.

    ``key`` picks a top-level entry (default: ``ema`` when present, as SiD / SiD-LSG save it).
    ``recipe`` is stored as ``fewstep_recipe`` metadata, which detection then takes as given.
    Existing outputs are replaced only with ``force``; the input is never overwritten.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    src = Path(src)
    if recipe is not None and recipe not in RECIPES:
        raise StudentLoadError(
            src, f"unknown recipe {recipe!r}.", f"use one of: {', '.join(sorted(RECIPES))}."
        )
    if not src.is_file():
        what = "is a folder" if src.is_dir() else "does not exist"
        raise StudentLoadError(src, f"the input {what}.", "give the path of a .pkl/.pt file.")
    dst = Path(dst) if dst else src.with_suffix(".safetensors")
    _check_outputs(src, dst, force)
    try:
        obj = restricted_load(src)
    except OSError as e:
        raise unreadable(src, e) from None
    if isinstance(obj, dict):
        pick = key or ("ema" if "ema" in obj else None)
        if pick is not None:
            if pick not in obj:
                raise StudentLoadError(
                    src,
                    f"the pickle has no entry {pick!r} (entries: {', '.join(map(str, obj))}).",
                    "pass --key with one of those entries.",
                )
            obj = obj[pick]
    try:
        tensors, config = extract_state_dict(obj)
    except (MemoryError, RecursionError, RuntimeError, TypeError, ValueError) as e:
        raise StudentLoadError(src, f"the pickle's tensors cannot be collected ({type(e).__name__}: "
                               f"{str(e)[:200]}).",
                               "the file is damaged or not a model pickle; it cannot be converted.") from None
    if not tensors:
        raise StudentLoadError(src, "the pickle holds no tensors.", "check that this is a model file.")
    if "__metadata__" in tensors:
        raise StudentLoadError(src, "the pickle has a tensor named __metadata__, a name safetensors "
                               "reserves.", "the file is crafted or damaged; it cannot be converted.")
    tensors = strip_precond_prefix(tensors)
    root = config.get("<root>", {})
    metadata = {"fewstep_converted_from": src.name, "fewstep_root_class": str(root.get("class", ""))}
    if any(k.startswith("map_layer0") for k in tensors):
        metadata["fewstep_format"] = "edm"
    if recipe is not None:
        metadata["fewstep_recipe"] = recipe
    # safetensors refuses shared storage: give every tensor its own.
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    try:
        save_file(tensors, str(dst), metadata=metadata)
        _readable_by_all(dst)
    except (OSError, SafetensorError) as e:
        raise StudentLoadError(dst, f"the output cannot be written ({e}).",
                               "check the output folder's permissions and free space.") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise StudentLoadError(src, f"the tensors cannot be written as safetensors ({type(e).__name__}: "
                               f"{str(e)[:200]}).", "the file is damaged or of an unusual kind.") from None
    if recipe is not None:  # the recipe must fit the network the file holds
        from .detect import detect

        try:
            detect(dst)
        except StudentLoadError:
            dst.unlink()
            raise
    cfg_path = dst.with_suffix(".json")
    try:
        cfg_path.write_text(json.dumps({"source": src.name, "modules": config}, indent=1))
    except OSError as e:
        raise StudentLoadError(cfg_path, f"the config cannot be written ({e.strerror or e}).",
                               "check the output folder's permissions and free space.") from None
    logger.info("wrote %s (%d tensors) and %s", dst, len(tensors), cfg_path)
    return dst, cfg_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_fewstep convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("file", help="a .pkl/.pt pickle (e.g. SiD network-snapshot-*.pkl)")
    parser.add_argument(
        "-o", "--output", default=None, help="output .safetensors (default: next to the input)"
    )
    parser.add_argument("--key", default=None, help="top-level entry to convert (default: 'ema' if present)")
    parser.add_argument(
        "--recipe",
        default=None,
        help="store this recipe in the file (sid_edm_1step, dmd2_imagenet_1step, ...); the loader uses it",
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        dst, cfg = convert(args.file, args.output, args.key, args.recipe, force=args.force)
    except StudentLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst} and {cfg}")
    return 0
