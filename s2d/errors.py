"""User-facing errors.

Every problem a user can cause (bad name, bad file, missing data) is raised as an
:class:`S2DError` whose message is one line naming the problem and the fix; the CLI
prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class S2DError(Exception):
    """An error the user can fix; its message is shown as is."""


class UnknownNameError(S2DError, KeyError):
    """An unknown model, dataset or exit name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(S2DError):
    """The dataset files are not on this machine."""


class CheckpointError(S2DError):
    """A checkpoint is corrupt, truncated or does not fit the architecture."""


class RunDirError(S2DError):
    """A run directory cannot be used (not writable, or holds a different run)."""


class UnsupportedModelError(S2DError):
    """The transform engine cannot split this model correctly."""


class ArchError(S2DError, ValueError):
    """A MultiStageArch is invalid for the model it is applied to."""
