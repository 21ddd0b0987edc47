"""Calibrated schedules as plain JSON: a small cache keyed by model and settings, and named files.

A record is one JSON object (:class:`ScheduleRecord`)::

    {"format": "comfyui_fewstep.calibrated_schedule/1", "sigmas": [14.61, ..., 0.0], "nfe": 6,
     "orders": [1, 2, 2, 2, 2, 1], "solver": {"solver": "multistep", "options": {"order": 2}, "label": "dpmpp_2m"},
     "model_hash": "...", "settings": {...}, "cost": {"total_nfe": 620, "seconds": 41.2, ...},
     "error": 0.0123, "created": "2025-01-01T12:00:00+00:00"}

A schedule calibrated for the fitted solver (:mod:`.fitted`) also has ``"coefficients"``: one
list of weights per step, valid only with its own ``sigmas``.

so a user can share it next to a workflow, edit it, or paste its ``sigmas`` anywhere. The cache
stores files named by :func:`cache_key` (a hash of the model fingerprint and the settings) in
``<root>/cache/``; named schedules live in ``<root>/<name>.json``. Writes are atomic (temporary
file + rename), and only successful calibrations reach the store (the node writes after
:func:`.calibration.calibrate` returns).

:func:`model_fingerprint` hashes a model's parameters cheaply: names, shapes, dtypes and a strided
sample of each tensor's values (not the whole tensor), plus any extra identity string (e.g. the
patch id of a patched model).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = "comfyui_fewstep.calibrated_schedule/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$")

__all__ = ["FORMAT", "ScheduleRecord", "ScheduleStore", "cache_key", "model_fingerprint", "validate_sigmas"]


def validate_sigmas(sigmas: Iterable[Any], where: str = "schedule") -> list[float]:
    """Floats that form a SIGMAS schedule: finite, strictly decreasing, ending in 0, at least one step."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: sigmas must be a list of numbers ({exc})") from exc
    if len(values) < 2 or values[-1] != 0.0:
        raise ValueError(f"{where}: sigmas need at least two values and must end in 0, got {values}")
    if not all(math.isfinite(v) and v >= 0.0 for v in values) or not all(a > b for a, b in itertools.pairwise(values)):
        raise ValueError(f"{where}: sigmas must be finite and strictly decreasing, got {values}")
    return values


def _validate_coefficients(rows: Any, n_steps: int) -> list[list[float]]:
    """A fitted solver's per-step weights: one list of finite numbers per step of the schedule."""
    if not isinstance(rows, list) or len(rows) != n_steps:
        raise ValueError(f"coefficients must be a list with one entry per step ({n_steps}), got {rows!r}")
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in row):
            raise ValueError(f"coefficients of step {n + 1} must be a list of finite numbers, got {row!r}")
        out.append([float(v) for v in row])
    return out


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
    created: str = ""
    format: str = FORMAT

    def __post_init__(self) -> None:
        self.sigmas = validate_sigmas(self.sigmas)
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"schedule record: nfe must be a positive integer, got {self.nfe!r}")
        if self.coefficients is not None:
            self.coefficients = _validate_coefficients(self.coefficients, len(self.sigmas) - 1)
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def from_result(cls, result: Any, model_hash: str = "", settings: Mapping[str, Any] | None = None) -> ScheduleRecord:
        """A record for a :class:`.calibration.CalibrationResult`."""
        return cls(sigmas=list(result.sigmas), nfe=int(result.nfe), solver=dict(result.solver), model_hash=model_hash,
                   settings=dict(settings or {}), cost=dict(result.cost), orders=list(result.orders),
                   error=float(result.error), coefficients=getattr(result, "coefficients", None))

    def sigmas_tensor(self) -> torch.Tensor:
        """ComfyUI's SIGMAS: a 1-D float32 CPU tensor."""
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "schedule file") -> ScheduleRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
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
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc


def model_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], extra: str = "",
                      samples_per_tensor: int = 64) -> str:
    """SHA-256 of parameter names, shapes, dtypes and ``samples_per_tensor`` strided values per tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        t = tensor.detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n:
            k = min(n, samples_per_tensor)
            # integer strides: a float32 linspace rounds n - 1 up to n past 2^24 elements
            idx = torch.arange(k, dtype=torch.int64, device=flat.device) * (n - 1) // max(k - 1, 1)
            digest.update(flat[idx].to("cpu", torch.float32).numpy().tobytes())
    digest.update(extra.encode())
    return digest.hexdigest()


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
        """Names of the saved schedules (file names without ``.json``), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if p.is_file())

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
        path = self.path_for(name)
        if not path.is_file():
            available = ", ".join(self.names()) or "none"
            raise ValueError(f"no saved schedule named {name!r} in {self.root} (available: {available})")
        return ScheduleRecord.from_json(path.read_text(encoding="utf-8"), str(path))

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
