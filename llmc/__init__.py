"""llmc: an ahead-of-time compiler for generative LLMs.

Importing llmc is cheap and never imports torch: the compiler front end (which needs torch and
transformers) loads only when a model is imported.
"""

from llmc.errors import LlmcError, LlmcWarning, UsageError

__version__ = "0.1.0"

__all__ = ["Engine", "EngineClosedError", "LlmcError", "LlmcWarning", "QueueFullError", "UsageError", "__version__",
           "import_model", "load"]


def __getattr__(name):
    # The engine loads on first use, so that importing llmc stays cheap.
    if name in ("Engine", "QueueFullError", "EngineClosedError"):
        from llmc.serve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")


def load(path, max_context=None, threads=None, kv_blocks=None):
    """Open a .llmc artifact and return a ``llmc.runtime.Model`` (generate, logits, chat, tokenizer;
    ``run_batch`` for steps of many sequences over a KV pool of ``kv_blocks`` blocks)."""
    from llmc.runtime import load as _load

    return _load(path, max_context=max_context, threads=threads, kv_blocks=kv_blocks)


def import_model(source, **options):
    """Trace ``source`` (a path, a built-in name, ``module:factory`` or an ``nn.Module``) to llmc IR.

    Returns an ``llmc.frontend.Imported`` holding the graph and what was learned about the model.
    """
    from llmc.frontend import import_model as _import_model

    return _import_model(source, **options)
