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
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem + "."
        if self.fix:
            text += " " + self.fix[0].upper() + self.fix[1:]
            text += "" if text.endswith(("?", "!")) else "."
        return " ".join(text.split())


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
