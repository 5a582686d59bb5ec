"""Every error quantcache raises on purpose, under one base class.

Each class carries the command-line exit code it maps to, so the CLI turns any
project error into its documented code (``quantcache --help``) with one ``except``
and no list to keep in sync. The classes keep the built-in base they always had
(``ValueError``, ``RuntimeError``) so existing ``except`` clauses still catch them.

This module imports nothing from the package: every layer may raise these.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FETCH",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "InputError",
    "ModelFetchError",
    "NonFiniteStateError",
    "QuantStateError",
    "QuantcacheError",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FETCH = 4
EXIT_INTERRUPTED = 130


class QuantcacheError(Exception):
    """Base of every deliberate quantcache error; ``exit_code`` is what the CLI returns for it."""

    exit_code: int = EXIT_INPUT


class InputError(QuantcacheError):
    """Bad user input that no more specific class describes (an unwritable output path ...)."""


class ConfigError(QuantcacheError, ValueError):
    """A quantization config that cannot be used; the message names the key and what is allowed."""


class QuantStateError(QuantcacheError, ValueError):
    """A saved or loaded quantization state does not fit; the message names the mismatch."""


class CalibrationError(QuantcacheError, RuntimeError):
    """Calibration cannot produce trustworthy parameters; the message names the layer and the fix."""


class NonFiniteStateError(CalibrationError):
    """A key/value state holds NaN or Inf where the cache was told to refuse them (``strict_finite``)."""


class DataError(QuantcacheError, ValueError):
    """Text or token input that cannot be used; the message says what is wrong and how to fix it."""


class ModelFetchError(QuantcacheError, RuntimeError):
    """A default model could not be fetched or verified; the message says why and what to try."""

    exit_code = EXIT_FETCH
