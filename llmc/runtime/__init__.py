"""The runtime: load an artifact and generate. numpy, tokenizers and jinja2 only, never torch."""

from llmc.runtime.model import Model, load
from llmc.runtime.sampler import SamplingParams

__all__ = ["Model", "SamplingParams", "load"]
