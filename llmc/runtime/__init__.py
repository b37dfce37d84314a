"""The runtime: load an artifact and generate. numpy, tokenizers and jinja2 only, never torch."""

from llmc.runtime.engine import Engine, EngineClosedError, QueueFullError
from llmc.runtime.model import Model, load
from llmc.runtime.requests import Delta, RequestHandle, RequestOutput
from llmc.runtime.sampler import SamplingParams

__all__ = ["Delta", "Engine", "EngineClosedError", "Model", "QueueFullError", "RequestHandle", "RequestOutput",
           "SamplingParams", "load"]
