"""Errors a user can cause. Each says what went wrong and what to do; the CLI prints one line and
exits with the error's ``exit_code``: 1 when a build or a run fails, 2 when llmc was asked for
something it does not take (a bad option value, a bad build file)."""

import numbers


def is_int(value) -> bool:
    """Whether a value a user gave is a whole number (an int or a numpy integer; a bool is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class LlmcError(Exception):
    """Base of every error a user can cause."""

    exit_code = 1


class UsageError(LlmcError):
    """An option, option value or build file llmc does not take; nothing was built."""

    exit_code = 2


class SourceError(LlmcError):
    """The model source cannot be found or read (missing path, corrupt file, missing package)."""


class UnsupportedModelError(LlmcError):
    """The model is not a decoder-only causal language model llmc can compile."""


class TraceError(LlmcError):
    """torch.export could not trace the model's code."""


class UnsupportedOpError(LlmcError):
    """The traced graph uses an ATen op the importer does not know."""


class InterpretError(LlmcError):
    """Inputs the reference interpreter cannot run the graph on (wrong shape or dtype)."""


class LlmcWarning(UserWarning):
    """Something the user should know that does not stop the build."""
