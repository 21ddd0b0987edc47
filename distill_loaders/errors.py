"""User-facing errors of the student loaders.

Every failure to read, recognise or sample a student file raises :class:`StudentLoadError`
(a ``ValueError``), whose message names the file, says what was found, and what to do.
ComfyUI shows the message in its error dialog and keeps running.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["StudentLoadError", "UnsafePickleError", "command", "unreadable"]

_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "fewstep.py"


def command(sub: str) -> str:
    """How to run one of the pack's commands (``convert FILE``, ``inspect FILE``): ``python -m
    comfyui_fewstep`` where the package is installed, and the pack folder's ``tools/fewstep.py``
    in a ComfyUI install (ComfyUI-Manager or ``git clone``), where it is not."""
    if not _SCRIPT.is_file():  # an installed wheel has no tools/
        return f"python -m comfyui_fewstep {sub}"
    return (f"python -m comfyui_fewstep {sub} (in a ComfyUI install, with ComfyUI's Python: "
            f"python {_SCRIPT} {sub})")


class StudentLoadError(ValueError):
    """A model file that cannot be loaded as a distilled student, with a message a user can act on.

    Attributes:
        path: the offending file (or folder).
        problem: what is wrong, in one sentence.
        hint: what the user can do about it.
    """

    def __init__(self, path: str | Path | None, problem: str, hint: str = "") -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.hint = hint
        where = f"{Path(self.path).name!s}: " if self.path else ""
        message = f"{where}{problem}"
        if hint:
            message += f" What to do: {hint}"
        if self.path:
            message += f" (file: {self.path})"
        super().__init__(message)


class UnsafePickleError(StudentLoadError):
    """A pickle asked to build an object the restricted unpickler does not allow."""


def unreadable(path: str | Path, error: OSError) -> StudentLoadError:
    """The error for a file the operating system would not read (missing, no permission, I/O error)."""
    reason = error.strerror or str(error)
    return StudentLoadError(
        path,
        f"the file cannot be read ({reason}).",
        "check that it exists, is readable by the user ComfyUI runs as, and is on a working disk.",
    )
