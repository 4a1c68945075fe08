"""One exception hierarchy for the whole workbench.

Every error the workbench raises on purpose derives from :class:`WorkbenchError`, so
callers (and the CLI, which maps classes to exit codes) can catch them in one place.
Classes that describe bad input also derive from ``ValueError`` so generic code that
expects ``ValueError`` keeps working.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error raised on purpose by the workbench."""


class ConfigError(WorkbenchError, ValueError):
    """A parameter, flag or configuration value is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class DataError(WorkbenchError):
    """A dataset is missing, corrupt or cannot be loaded."""


class ModelError(WorkbenchError):
    """A model cannot be built or does not suit the requested operation."""


class CheckpointError(WorkbenchError):
    """A checkpoint is missing, corrupt, or does not match the model/data."""


class TrainingDivergedError(WorkbenchError):
    """The training loss became NaN or infinite."""

    def __init__(self, message: str, *, epoch: int, step: int, loss: float) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss


class RunDirError(WorkbenchError):
    """An output directory would be overwritten, or cannot be used."""


class NotebookError(WorkbenchError):
    """A notebook failed while executing; carries the failing cell."""

    def __init__(self, message: str, *, notebook: str, cell_index: int | None = None,
                 error_name: str | None = None, error_value: str | None = None) -> None:
        super().__init__(message)
        self.notebook = notebook
        self.cell_index = cell_index
        self.error_name = error_name
        self.error_value = error_value


class MissingDependencyError(WorkbenchError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


class WorkbenchWarning(UserWarning):
    """Warnings issued by the workbench (e.g. a layer left unquantized)."""
