"""Graph -> graph rewrites, one concern per module, installed as ``llmc.passes``."""
