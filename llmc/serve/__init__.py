"""Many requests on one Model: the engine (requests, scheduler, paged KV pool with a prefix cache,
sampling per request). Like the runtime it stands on, it never imports torch or the compiler."""

from llmc.serve.engine import Engine, EngineClosedError, QueueFullError
from llmc.serve.requests import Completion, Delta, RequestHandle, RequestOutput, TokenLogprob

__all__ = ["Completion", "Delta", "Engine", "EngineClosedError", "QueueFullError", "RequestHandle", "RequestOutput",
           "TokenLogprob"]
