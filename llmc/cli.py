"""The ``llmc`` command. Errors a user can cause print as one line and exit 1; usage errors exit 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from llmc import __version__
from llmc.errors import LlmcError, LlmcWarning
from llmc.pipeline import PHASE_NAMES


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return args.run(args)
    except LlmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in llmc: still one line unless asked for the traceback
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} "
              "(a bug in llmc; rerun with LLMC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description="Ahead-of-time compiler for generative LLMs.")
    parser.add_argument("--version", action="version", version=f"llmc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="show what llmc makes of a model source",
                                  description="Trace a model source and summarise its graph.")
    inspect.add_argument("source", help="Hugging Face model directory, .gguf file, built-in name (smollm2) "
                                        "or module:factory")
    inspect.add_argument("--ir", action="store_true", help="print the full IR after the op histogram")
    inspect.add_argument("--after", default="import", metavar="PHASE",
                         help="show the graph after this pipeline phase: " + ", ".join(PHASE_NAMES)
                         + " (default: import)")
    inspect.add_argument("--dump-ir", metavar="DIR", help="write the IR after every phase into DIR")
    inspect.add_argument("--all-logits", action="store_true",
                         help="keep logits for every position (default: the last position only)")
    inspect.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                         help="attention implementation to trace (default: the model's own)")
    inspect.set_defaults(run=run_inspect)
    return parser


def run_inspect(args) -> int:
    from llmc.pipeline import run_pipeline

    result = run_pipeline(args.source, until=args.after, dump_ir=args.dump_ir, all_logits=args.all_logits,
                          attn_implementation=args.attn)
    imported, graph = result.imported, result.graph
    config = imported.config
    out = sys.stdout
    source = imported.source
    out.write(f"source    {source.spec} ({source.kind}{': ' + str(source.path) if source.path else ''})\n")
    if config:
        out.write(f"model     {config.get('model_type', '?')}: {_describe_config(config)}\n")
    params = sum(a.size for a in graph.weights.values())
    out.write(f"weights   {len(graph.weights)} tensors, {params / 1e6:.1f}M values, "
              f"{graph.weight_bytes() / 1e6:.1f} MB\n")
    signature = ", ".join(f"%{n.attrs['name']}: {n.type}" for n in graph.inputs)
    results = ", ".join(str(n.type) for n in graph.outputs)
    out.write(f"graph     {len(graph.nodes())} nodes, ({signature}) -> {results}, seq <= {imported.max_seq}\n")
    out.write("time      " + ", ".join(f"{k} {v:.1f} s" for k, v in imported.timings.items())
              + "".join(f", {k} {v:.1f} s" for k, v in result.timings.items() if k != "import") + "\n")
    if not source.has_tokenizer:
        out.write("tokenizer none (token ids only)\n")
    out.write(f"\nop histogram after {args.after}:\n")
    for op, count in graph.op_histogram().items():
        out.write(f"  {op:<12} {count}\n")
    if args.ir:
        out.write("\n" + str(graph))
    return 0


def _describe_config(config: dict) -> str:
    keys = [("num_hidden_layers", "layers"), ("n_layer", "layers"), ("hidden_size", "hidden"), ("n_embd", "hidden"),
            ("num_attention_heads", "heads"), ("n_head", "heads"), ("num_key_value_heads", "kv heads"),
            ("vocab_size", "vocab")]
    parts, seen = [], set()
    for key, label in keys:
        if config.get(key) is not None and label not in seen:
            parts.append(f"{config[key]} {label}")
            seen.add(label)
    return ", ".join(parts)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, LlmcWarning):
        print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
