"""Hardware targets, one package each, installed as ``llmc.targets``. A target turns an
optimised graph into code, builds it and launches it; it never rewrites the graph."""
