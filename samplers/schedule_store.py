"""Calibrated schedules as plain JSON: a small cache keyed by model and settings, and named files.

A record is one JSON object (:class:`ScheduleRecord`)::

    {"format": "comfyui_fewstep.calibrated_schedule/1", "sigmas": [14.61, ..., 0.0], "nfe": 6,
     "orders": [1, 2, 2, 2, 2, 1], "solver": {"solver": "multistep", "options": {"order": 2}, "label": "dpmpp_2m"},
     "model_hash": "...", "settings": {...}, "cost": {"total_nfe": 620, "seconds": 41.2, ...},
     "error": 0.0123, "created": "2025-01-01T12:00:00+00:00"}

A schedule calibrated for the fitted solver (:mod:`.fitted`) also has ``"coefficients"``: one
list of weights per step, valid only with its own ``sigmas``, and ``"fitted_digest"``, which binds
the two: a file whose sigmas or coefficients were edited is refused when it is loaded. A fitted
schedule with a mean first step (solver option ``"first_step": "mean"``) also stores that step's
data prediction, ``"first_prediction": {"shape": [1, C, H, W], "float32_base64": "..."}`` (the
little-endian float32 values, base64; 64 KiB for an SD1.5 latent at 512x512), covered by the digest.

A user can share a record next to a workflow, edit its ``sigmas`` (without coefficients), or
paste them anywhere. The cache stores files named by :func:`cache_key` (a hash of the model
fingerprint and the settings) in ``<root>/cache/``; named schedules live in
``<root>/<name>.json``. Writes are atomic (temporary file + rename), and only successful
calibrations reach the store (the node writes after :func:`.calibration.calibrate` returns).

:func:`model_fingerprint` hashes a model's parameters cheaply: names, shapes, dtypes and a strided
sample of each tensor's values (not the whole tensor), plus any extra identity string;
:func:`object_fingerprint` hashes the rest of a model by content (patches, options, wrappers).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import math
import numbers
import os
import re
import tempfile
import types
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy
import torch

logger = logging.getLogger(__name__)

FORMAT = "comfyui_fewstep.calibrated_schedule/1"
#: version of the model fingerprint behind ``model_hash`` (:func:`model_fingerprint` with
#: :func:`object_fingerprint` of the patches and options). Raised when the fingerprint changes, so a
#: file saved with an older one is not taken for a schedule of another model.
FINGERPRINT_VERSION = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$")
#: most values a SIGMAS list may have (10000 steps)
MAX_SIGMAS = 10_001

__all__ = ["FORMAT", "ScheduleRecord", "ScheduleStore", "cache_key", "decode_first_prediction",
           "encode_first_prediction", "model_fingerprint", "object_fingerprint", "validate_sigmas"]


def validate_sigmas(sigmas: Iterable[Any], where: str = "schedule") -> list[float]:
    """Floats that form a SIGMAS schedule: finite, strictly decreasing, ending in 0, at least one step."""
    items = list(sigmas)
    if any(isinstance(s, bool) for s in items):
        raise ValueError(f"{where}: sigmas must be a list of numbers, got {items}")
    try:
        values = [float(s) for s in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: sigmas must be a list of numbers ({exc})") from exc
    if len(values) > MAX_SIGMAS:
        raise ValueError(f"{where}: {len(values)} sigmas; a schedule has at most {MAX_SIGMAS}")
    if len(values) < 2 or values[-1] != 0.0:
        raise ValueError(f"{where}: sigmas need at least two values and must end in 0, got {values}")
    if not all(math.isfinite(v) and v >= 0.0 for v in values) or not all(a > b for a, b in itertools.pairwise(values)):
        raise ValueError(f"{where}: sigmas must be finite and strictly decreasing, got {values}")
    return values


#: fitted weights are corrections of order 1 (0.5-5 on the benchmark problems); far larger
#: ones come from a damaged or hand-edited file and would overflow in sampling
MAX_COEFFICIENT = 1e4


#: most values a stored first prediction may have (a 16-channel latent of 2048x2048 pixels)
MAX_FIRST_PREDICTION = 16 * 256 * 256


def fitted_digest(sigmas: list[float], coefficients: list[list[float]],
                  first_prediction: Mapping[str, Any] | None = None) -> str:
    """A digest binding fitted coefficients (and a mean first step's prediction) to the sigmas
    they were fitted on."""
    payload: list[Any] = [sigmas, coefficients]
    if first_prediction is not None:
        payload.append([first_prediction["shape"], first_prediction["float32_base64"]])
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def encode_first_prediction(tensor: torch.Tensor) -> dict[str, Any]:
    """The JSON form of a first-step prediction (``[1, ...]``): its shape and float32 values."""
    values = tensor.detach().to("cpu", torch.float32).contiguous()
    data = values.numpy().astype("<f4").tobytes()
    return {"shape": list(values.shape), "float32_base64": base64.b64encode(data).decode("ascii")}


def decode_first_prediction(data: Any) -> torch.Tensor:
    """The tensor of :func:`encode_first_prediction`'s JSON form; ValueError saying what is wrong."""
    if not isinstance(data, dict) or set(data) != {"shape", "float32_base64"}:
        raise ValueError("'first_prediction' must be an object with 'shape' and 'float32_base64'")
    shape = data["shape"]
    if (not isinstance(shape, list) or len(shape) < 2 or shape[0] != 1
            or not all(_is_int(v) and v >= 1 for v in shape) or math.prod(shape) > MAX_FIRST_PREDICTION):
        raise ValueError(f"'first_prediction.shape' must be [1, ...] with positive sizes (at most "
                         f"{MAX_FIRST_PREDICTION} values), got {shape!r}")
    try:
        raw = base64.b64decode(str(data["float32_base64"]), validate=True)
    except ValueError:
        raise ValueError("'first_prediction.float32_base64' is not base64 text") from None
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f"'first_prediction' holds {len(raw) // 4} values, its shape {shape} needs "
                         f"{math.prod(shape)}; the file is damaged")
    tensor = torch.from_numpy(numpy.frombuffer(raw, dtype="<f4").astype(numpy.float32)).reshape(shape)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("'first_prediction' has non-finite values; the file is damaged")
    return tensor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_coefficients(rows: Any, n_steps: int) -> list[list[float]]:
    """A fitted solver's per-step weights: one list of finite numbers per step of the schedule."""
    if not isinstance(rows, list) or len(rows) != n_steps:
        raise ValueError(f"coefficients must be a list with one entry per step ({n_steps}), got {rows!r}")
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, list) or not all(_is_real(v) and math.isfinite(v) for v in row):
            raise ValueError(f"coefficients of step {n + 1} must be a list of finite numbers, got {row!r}")
        if any(abs(v) > MAX_COEFFICIENT for v in row):
            raise ValueError(f"coefficients of step {n + 1} are {row!r}; fitted coefficients are of order 1 "
                             f"(at most {MAX_COEFFICIENT:g}), so the file is damaged or was edited")
        out.append([float(v) for v in row])
    return out


def _is_parameterization(saved: Any) -> bool:
    """``[kind, family, sigma_min, sigma_max]``, or ``[kind, sigma_min, sigma_max]`` from older files."""
    if not isinstance(saved, list) or len(saved) not in (3, 4):
        return False
    names, bounds = saved[:-2], saved[-2:]
    return (all(isinstance(v, str) for v in names)
            and all(_is_real(v) and math.isfinite(v) for v in bounds))


@dataclass
class ScheduleRecord:
    """One calibrated schedule and its provenance (see the module docstring for the JSON)."""

    sigmas: list[float]
    nfe: int
    solver: dict[str, Any]
    model_hash: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    orders: list[int] = field(default_factory=list)
    error: float | None = None
    coefficients: list[list[float]] | None = None
    first_prediction: dict[str, Any] | None = None
    fitted_digest: str = ""
    fingerprint_version: int = 0  # 0: a file from before the version was stored
    created: str = ""
    format: str = FORMAT

    def __post_init__(self) -> None:
        self.sigmas = validate_sigmas(self.sigmas)
        self._check_types()
        if not _is_int(self.fingerprint_version):
            self.fingerprint_version = 0  # hand-edited: treat as unknown, it only words a note
        if not _is_int(self.nfe) or self.nfe < 1:
            raise ValueError(f"schedule record: nfe must be a positive integer, got {self.nfe!r}")
        # decoded once: checked here, handed to the sampler by first_prediction_tensor()
        self._first_tensor = (None if self.first_prediction is None
                              else decode_first_prediction(self.first_prediction))
        if self.coefficients is not None:
            self.coefficients = _validate_coefficients(self.coefficients, len(self.sigmas) - 1)
            mean_first = (self.solver.get("options") or {}).get("first_step") == "mean"
            if mean_first and self.first_prediction is None:
                raise ValueError("its solver has a mean first step but the file has no 'first_prediction'; "
                                 "calibrate again, or remove 'coefficients' to run the sigmas with plain "
                                 "DPM-Solver++(2M)")
            digest = fitted_digest(self.sigmas, self.coefficients, self.first_prediction)
            if self.fitted_digest and self.fitted_digest != digest:
                raise ValueError(
                    "its sigmas or fitted coefficients were changed after calibration (fitted_digest does "
                    "not match), and fitted coefficients hold only for the sigmas they were fitted on; "
                    "calibrate again, or remove 'coefficients' to run the sigmas with plain DPM-Solver++(2M)"
                )
            self.fitted_digest = digest
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def _check_types(self) -> None:
        """Every field has the JSON type the nodes read (a hand-edited file says which field is wrong)."""
        for name in ("solver", "settings", "cost"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"'{name}' must be a JSON object, got {getattr(self, name)!r}")
        for name in ("model_hash", "fitted_digest", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"'{name}' must be a string, got {getattr(self, name)!r}")
        options = self.solver.get("options")
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"'solver.options' must be a JSON object of solver options, got {options!r}")
        for key in ("solver", "label"):
            if self.solver.get(key) is not None and not isinstance(self.solver[key], str):
                raise ValueError(f"'solver.{key}' must be a string, got {self.solver[key]!r}")
        if not isinstance(self.orders, list) or not all(_is_int(o) and o >= 1 for o in self.orders):
            raise ValueError(f"'orders' must be a list of positive integers (one per step), "
                             f"got {self.orders!r}")
        if self.error is not None and not _is_real(self.error):
            raise ValueError(f"'error' must be a number, got {self.error!r}")
        saved = self.settings.get("parameterization")
        if saved is not None and not _is_parameterization(saved):
            raise ValueError("'settings.parameterization' must be [kind, family, sigma_min, sigma_max] "
                             f"(or [kind, sigma_min, sigma_max]) with numeric sigmas, got {saved!r}")

    @classmethod
    def from_result(cls, result: Any, model_hash: str = "", settings: Mapping[str, Any] | None = None) -> ScheduleRecord:
        """A record for a :class:`.calibration.CalibrationResult`."""
        return cls(sigmas=list(result.sigmas), nfe=int(result.nfe), solver=dict(result.solver), model_hash=model_hash,
                   settings=dict(settings or {}), cost=dict(result.cost), orders=list(result.orders),
                   error=float(result.error), coefficients=getattr(result, "coefficients", None),
                   first_prediction=None if getattr(result, "first_prediction", None) is None
                   else encode_first_prediction(result.first_prediction),
                   fingerprint_version=FINGERPRINT_VERSION if model_hash else 0)

    def sigmas_tensor(self) -> torch.Tensor:
        """ComfyUI's SIGMAS: a 1-D float32 CPU tensor."""
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def first_prediction_tensor(self) -> torch.Tensor | None:
        """The mean first step's data prediction (``[1, ...]`` float32), or None."""
        return self._first_tensor

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "schedule file") -> ScheduleRecord:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an over-long number, deep nesting
            raise ValueError(f"{where} is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 (file content)
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{where}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
        if "sigmas" not in data:
            raise ValueError(f"{where}: no 'sigmas' list")
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in data.items() if k in known}
        data.setdefault("nfe", len(data["sigmas"]) - 1)
        data.setdefault("solver", {})
        try:
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc


def _feed_tensor(digest: Any, tensor: torch.Tensor, samples: int) -> None:
    """Shape, dtype and ``samples`` values at even integer strides of ``tensor`` into ``digest``."""
    t = tensor.detach()
    digest.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.reshape(-1)
    n = flat.numel()
    if n:
        k = min(n, samples)
        # integer strides: a float32 linspace rounds n - 1 up to n past 2^24 elements
        idx = torch.arange(k, dtype=torch.int64, device=flat.device) * (n - 1) // max(k - 1, 1)
        digest.update(flat[idx].to("cpu", torch.float32).numpy().tobytes())


def model_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], extra: str = "",
                      samples_per_tensor: int = 64) -> str:
    """SHA-256 of parameter names, shapes, dtypes and ``samples_per_tensor`` strided values per tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(f"{name}|".encode())
        _feed_tensor(digest, tensor, samples_per_tensor)
    digest.update(extra.encode())
    return digest.hexdigest()


#: how deep :func:`object_fingerprint` follows containers, attributes and closures
FINGERPRINT_DEPTH = 16


def object_fingerprint(value: Any, samples_per_tensor: int = 64) -> str:
    """SHA-256 of what ``value`` computes with, stable across processes.

    For the parts of a model that are not its weights: patch lists, option dictionaries, wrapper
    functions. Numbers, strings and tensors (as in :func:`model_fingerprint`) by value; containers
    by their items; functions by module, qualified name, byte code, bound ``self`` and closure
    values; modules by their parameters, buffers and plain attributes; other objects by class and
    attributes. Object addresses and ids never enter (they change with every run); cycles and
    nesting deeper than :data:`FINGERPRINT_DEPTH` are cut off (an IPAdapter-style attention patch's
    weight sits 9 levels below the model options).
    """
    digest = hashlib.sha256()
    _feed_object(digest, value, samples_per_tensor, set(), 0)
    return digest.hexdigest()


def _class_name(kind: type) -> str:
    """A class by the names of its bases too: classes made at run time share one qualified name."""
    return "<" + ",".join(f"{c.__module__}.{c.__qualname__}" for c in kind.__mro__) + ">"


def _key_name(key: Any) -> str:
    """A mapping key as text without object addresses (plain values by repr, others by class)."""
    if key is None or isinstance(key, (numbers.Number, str, bytes)):
        return repr(key)
    if isinstance(key, tuple):
        return "(" + ",".join(_key_name(k) for k in key) + ")"
    return _class_name(type(key))


def _feed_object(digest: Any, value: Any, samples: int, active: set[int], depth: int) -> None:
    put = digest.update
    if value is None or isinstance(value, (numbers.Number, str, bytes)):
        put(f"{type(value).__name__}:{value!r};".encode())
        return
    if isinstance(value, (torch.dtype, torch.device)):
        put(f"{value};".encode())
        return
    if isinstance(value, torch.Tensor):
        put(b"tensor:")
        _feed_tensor(digest, value, samples)
        return
    put(_class_name(type(value)).encode())
    if depth >= FINGERPRINT_DEPTH or id(value) in active:
        return
    active.add(id(value))
    try:
        if isinstance(value, Mapping):
            for k, v in sorted(value.items(), key=lambda item: _key_name(item[0])):
                put(f"{_key_name(k)}=".encode())
                _feed_object(digest, v, samples, active, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                _feed_object(digest, v, samples, active, depth + 1)
        elif isinstance(value, (set, frozenset)):
            for v in sorted(value, key=_key_name):
                _feed_object(digest, v, samples, active, depth + 1)
        elif isinstance(value, torch.nn.Module):
            tensors = itertools.chain(value.named_parameters(), value.named_buffers())
            for name, t in sorted(tensors, key=lambda item: item[0]):
                put(f"{name}=".encode())
                _feed_tensor(digest, t, samples)
            # plain settings too (a flow model_sampling's shift and timestep multiplier)
            settings = {k: v for k, v in vars(value).items() if not k.startswith("_") and k != "training"}
            _feed_object(digest, settings, samples, active, depth + 1)
        elif isinstance(value, type):
            put(_class_name(value).encode())
        elif isinstance(value, types.CodeType):  # byte code, names and constants (nested code too)
            put(value.co_code + repr(value.co_names).encode())
            _feed_object(digest, value.co_consts, samples, active, depth + 1)
        elif callable(value) and hasattr(value, "__code__"):  # functions, lambdas, bound methods
            put(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}".encode())
            _feed_object(digest, value.__code__, samples, active, depth + 1)
            _feed_object(digest, getattr(value, "__self__", None), samples, active, depth + 1)
            for cell in getattr(value, "__closure__", None) or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                _feed_object(digest, contents, samples, active, depth + 1)
            _feed_object(digest, getattr(value, "__defaults__", None), samples, active, depth + 1)
        elif hasattr(value, "func") and hasattr(value, "args"):  # functools.partial
            for v in (value.func, value.args, getattr(value, "keywords", None)):
                _feed_object(digest, v, samples, active, depth + 1)
        elif hasattr(value, "__dict__"):
            _feed_object(digest, vars(value), samples, active, depth + 1)
        elif hasattr(value, "__qualname__"):  # builtins
            put(f"{getattr(value, '__module__', '')}.{value.__qualname__};".encode())
    finally:
        active.discard(id(value))


def cache_key(model_hash: str, settings: Mapping[str, Any]) -> str:
    """Hash of the model fingerprint and the calibration settings (JSON with sorted keys)."""
    payload = json.dumps({"model": model_hash, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ScheduleStore:
    """Named schedules in ``root`` and the calibration cache in ``root/cache``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.cache_dir = self.root / "cache"

    # -- cache ----------------------------------------------------------------------------------
    def get(self, key: str) -> ScheduleRecord | None:
        """The cached record for ``key``, or None (a corrupt cache file is logged and ignored)."""
        path = self.cache_dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return ScheduleRecord.from_json(path.read_text(encoding="utf-8"), str(path))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable calibration cache entry %s: %s", path, exc)
            return None

    def put(self, key: str, record: ScheduleRecord) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", key):
            raise ValueError(f"cache key must be a hex digest, got {key!r}")
        return self._write(self.cache_dir / f"{key}.json", record)

    # -- named schedules ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of the saved schedules (file names without ``.json``), sorted: every file that
        :meth:`load` opens (no hidden or temporary files, no links out of the folder)."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob("*.json"):
            name = path.name[: -len(".json")]
            try:
                if self._locate(name) == path:
                    out.append(name)
            except ValueError:
                continue
        return sorted(out)

    def find(self, name: str) -> Path:
        """The file of a saved schedule: ``<name>.json`` in the folder (or ``name`` itself when it ends
        in ``.json``). Any file name the folder holds is accepted, as a shared file may be named
        anything, but never a path out of the folder, a hidden file or a link to a file outside."""
        path = self._locate(name)
        if path is None:
            available = ", ".join(self.names()) or "none"
            raise ValueError(f"no saved schedule named {name!r} in {self.root} (available: {available})")
        return path

    def _locate(self, name: str) -> Path | None:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise ValueError(f"schedule name {name!r} is not allowed: give a file name from the schedules "
                             "folder, without folders")
        root = self.root.resolve()
        candidates = [self.root / f"{name}.json"] + ([self.root / name] if name.endswith(".json") else [])
        for path in candidates:
            if path.is_file():
                if not path.resolve().is_relative_to(root):
                    raise ValueError(f"schedule {name!r} is a link to a file outside {self.root}; copy "
                                     "the file into the folder instead")
                return path
        return None

    def path_for(self, name: str) -> Path:
        name = name.removesuffix(".json")
        if not _NAME.fullmatch(name) or ".." in name:
            raise ValueError(
                f"schedule name {name!r} is not allowed: use letters, digits, space, '_', '-', '.' "
                "(up to 100 characters, no folders)"
            )
        return self.root / f"{name}.json"

    def save(self, name: str, record: ScheduleRecord) -> Path:
        return self._write(self.path_for(name), record)

    def load(self, name: str) -> ScheduleRecord:
        path = self.find(name)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                             "JSON") from None
        return ScheduleRecord.from_json(text, str(path))

    def _write(self, path: Path, record: ScheduleRecord) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
