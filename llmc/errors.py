"""Errors a user can cause. Each says what went wrong and what to do; the CLI prints one line."""


class LlmcError(Exception):
    """Base of every error a user can cause."""


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
