"""User-facing errors.

Every failure a user can cause (bad file, bad config, wrong base, quantized base, API down) is raised
as a ``CogumiError``. The CLI prints its message once, without a traceback, and exits with its code.
Messages name the file / line / key and say what to do.
"""

from __future__ import annotations


class CogumiError(Exception):
    """An error caused by the user's input or environment; message is shown as-is."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(CogumiError):
    """Invalid run/plan/criteria configuration (names the key)."""


class DataError(CogumiError):
    """Invalid data file (names file and line)."""


class RedFlagError(CogumiError):
    """A lineage/integrity red flag that stops the run (quantized base, wrong base, NaN, ...)."""

    exit_code = 1


class GateFailed(CogumiError):
    """Success criteria not met."""

    exit_code = 1
