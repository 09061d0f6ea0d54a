"""One family of user-facing errors.

Every mistake a user can make (a missing file, an unreadable raster, a band the scene does not
have, a raster without a CRS, an output that already exists, a bad recipe key) raises a
:class:`DeoError`. The command line prints ``error: <problem>. <fix>`` on one line and exits
with :attr:`DeoError.exit_code`; ``-v`` adds the traceback. Anything that is not a
``DeoError`` is a bug in deo and keeps its traceback.
"""

from __future__ import annotations


class DeoError(Exception):
    """A user mistake or an unusable input, reported as one line.

    ``problem`` says what is wrong, ``fix`` says what to do about it.
    """

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        worker = None
        if fix is None and problem.startswith(_WORKER_PREFIX):
            worker, problem = problem, _worker_message(problem)
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.one_line())
        if worker is not None and worker != problem and hasattr(self, "add_note"):
            self.add_note(worker)  # -v shows where in the worker it was raised

    def one_line(self) -> str:
        text = self.problem + "."
        if self.fix:
            text += " " + self.fix[0].upper() + self.fix[1:]
            text += "" if text.endswith(("?", "!")) else "."
        return " ".join(text.split())


#: How PyTorch re-raises an error from a DataLoader worker: ``type(err)(text)`` where ``text`` is
#: the worker's whole traceback (``torch.utils.data._utils.ExceptionWrapper``).
_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def _worker_message(text: str) -> str:
    """The original one-line message inside a DataLoader worker's re-raised traceback (``text``
    itself when it is not one): its last line, ``deo_cli.errors.DataError: <message>``."""
    if _WORKER_TRACEBACK not in text or " worker process " not in text.split("\n", 1)[0]:
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and "Error" in name else text


class InputNotFoundError(DeoError):
    """An input path, glob or URL points at nothing."""


class RasterReadError(DeoError):
    """A file exists but GDAL cannot read it as a raster (or the read failed)."""


class BandError(DeoError):
    """Bands are missing, ambiguous or unnamed."""


class GeoreferenceError(DeoError):
    """A raster has no CRS/transform, or two rasters cannot be put on one grid."""


class UnitError(DeoError):
    """Pixel values are in a unit the model cannot use (e.g. 0-255 given to a DN model)."""


class OutputError(DeoError):
    """An output cannot be written where it was asked for (no such folder, not writable, the
    disk is full)."""


class OutputExistsError(OutputError):
    """The output already exists and ``--overwrite`` was not given."""


class OutputLockedError(OutputError):
    """Another deo run is writing the same output (its lock file names it)."""


class RecipeError(DeoError):
    """A recipe file, key or value is invalid."""

    exit_code = 2


class UsageError(DeoError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class WeightsError(DeoError):
    """Model weights cannot be found, fetched or loaded."""


class DataError(DeoError):
    """A training or benchmark data set is missing or malformed."""


class NotBuiltError(DeoError):
    """A command whose core has not been built yet (never pretends to work)."""

    exit_code = 2


def note_kept(exc: BaseException, path) -> None:
    """Record on ``exc`` (an interruption on its way out) that ``path`` was kept for ``--resume``;
    the command line's message on Ctrl-C names what was kept (:func:`kept_paths`)."""
    kept = list(getattr(exc, "deo_kept", ()))
    kept.append(str(path))
    exc.deo_kept = kept


def kept_paths(exc: BaseException) -> list[str]:
    """What :func:`note_kept` recorded on ``exc`` (empty: nothing was kept)."""
    return list(getattr(exc, "deo_kept", ()))
