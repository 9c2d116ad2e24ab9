"""Errors that reach the user as one clear line (the CLI prints them and exits 2)."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for expected, user-facing failures: bad input, missing files, bad arguments.

    The message must be a single line that names the file / field / argument and what was expected.
    """

    exit_code = 2

    def __str__(self) -> str:  # keep it one line whatever the caller passed
        return " ".join(super().__str__().split())


class DataError(PipelineError):
    """A data file (cases, toolkits, run files, manifest) does not match its contract."""


class NamingError(PipelineError):
    """A model or run-file name cannot be parsed (e.g. an ambiguous seed)."""


class ConfigError(PipelineError):
    """A setting or command-line argument is invalid."""
