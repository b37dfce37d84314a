"""The ``llmc`` command. Exit codes: 0 success; 1 an error a user can cause (a failed build, a corrupt
artifact, an unreadable model), printed as one line; 2 a usage error (an unknown option, a bad
option value, a bad build file), nothing done. With ``--json`` an error is also printed to stdout
as ``{"ok": false, "error": ..., "exit_code": ...}``. SIGTERM and SIGHUP (but for ``serve``, which
drains) end a command as Ctrl-C does, removing what it was writing; the exit code is 128 + the
signal's number."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings

from llmc import __version__, targets
from llmc.errors import LlmcError, LlmcWarning, UsageError
from llmc.pipeline import PHASE_NAMES


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is so that what it was writing is removed
    (the default action ends the process with a half-written temporary file left behind)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    # The server handles SIGTERM itself (it drains); every other command cleans up and exits.
    handled = (signal.SIGTERM, signal.SIGHUP) if args.command != "serve" and \
        threading.current_thread() is threading.main_thread() else ()
    before = {sig: signal.signal(sig, _terminate) for sig in handled}
    try:
        return args.run(args)
    except Terminated as exc:
        print(f"terminated by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except LlmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(exc), "exit_code": exc.exit_code}))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                      # the reader went away (llmc inspect ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug in llmc: still one line unless asked for the traceback
        if os.environ.get("LLMC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} "
              "(a bug in llmc; rerun with LLMC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description="Ahead-of-time compiler for generative LLMs.")
    parser.add_argument("--version", action="version", version=f"llmc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="show an artifact, or what llmc makes of a model source",
                                  description="Summarise a .llmc artifact's manifest, or trace a model source "
                                              "and summarise its graph.")
    inspect.add_argument("source", help=".llmc file, Hugging Face model directory, .gguf file, built-in name "
                                        "(smollm2) or module:factory")
    inspect.add_argument("--ir", action="store_true", help="print the full IR after the op histogram")
    inspect.add_argument("--after", default="import", metavar="PHASE",
                         help="show the graph after this pipeline phase: " + ", ".join(PHASE_NAMES)
                         + " (default: import)")
    inspect.add_argument("--dump-ir", metavar="DIR", help="write the IR after every phase into DIR")
    inspect.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                         help="attention implementation to trace (default: the model's own)")
    inspect.set_defaults(run=run_inspect)

    compile_ = commands.add_parser("compile", help="build a .llmc artifact from a model source",
                                   description="Trace, optimise and package a model for one target.")
    compile_.add_argument("source", help="Hugging Face model directory, .gguf file, .onnx decoder, built-in name or module:factory")
    compile_.add_argument("-o", "--output", required=True, help="the .llmc file to write")
    compile_.add_argument("--target", default=targets.DEFAULT, choices=list(targets.REGISTRY),
                          help="; ".join(f"{t.name}: {t.summary}" for t in targets.REGISTRY.values())
                          + f" (default {targets.DEFAULT})")
    _target_options(compile_)
    compile_.add_argument("--quant", default=None, metavar="SCHEME",
                          help="weight format: f32, f16, q8, q4g32, q4g128, or gguf (a GGUF source's Q4_0/Q4_1/Q8_0 "
                               "blocks kept as they are); default gguf for a GGUF source, f32 otherwise")
    compile_.add_argument("--calib", metavar="FILE", default=None,
                          help="calibrate quantized weights (AWQ-style scales) on this text; 'default' uses the "
                               "public-domain text shipped with llmc")
    compile_.add_argument("--kv", default=None, choices=["f16", "f32", "int8"],
                          help="KV cache storage: f16 (the default where the target has it: half f32's bytes), "
                               "f32, or int8 with a scale per head and position")
    compile_.add_argument("--block-size", type=int, default=None, metavar="TOKENS",
                          help="tokens per block of the paged KV pool: a power of two up to 256 (default 16)")
    compile_.add_argument("--context", type=int, default=None, metavar="TOKENS",
                          help="the longest sequence (prompt + generated) the artifact takes (default: the model's own)")
    _cache_option(compile_)
    compile_.add_argument("--json", action="store_true", help="print what was built as JSON on stdout")
    compile_.add_argument("--attn", choices=["sdpa", "eager"], default=None, help=argparse.SUPPRESS)
    compile_.set_defaults(run=run_compile)

    build = commands.add_parser("build", help="build every artifact a build file (llmc.toml) lists",
                                description="Build every artifact of a build file from one import of its model, "
                                            "then print a summary: artifact, size, compile time, cache hits.")
    build.add_argument("file", nargs="?", default="llmc.toml", help="the build file (default: llmc.toml)")
    build.add_argument("--only", action="append", metavar="NAME",
                       help="build only this artifact (repeat for several)")
    _cache_option(build, default=None)
    build.add_argument("--json", action="store_true", help="print the build's result as JSON on stdout")
    build.set_defaults(run=run_build)

    verify = commands.add_parser("verify", help="check artifacts' checksums and show what they were built from",
                                 description="Check every section checksum of each artifact and print what it was "
                                             "built from: input hashes, llmc version, target, scheme, options.")
    verify.add_argument("files", nargs="+", metavar="FILE", help=".llmc artifacts")
    verify.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    verify.set_defaults(run=run_verify)

    export = commands.add_parser("export", help="write an artifact in its target's standalone format",
                                 description="Write an artifact in its target's own standard format into a new "
                                             "folder, for tools that take that format without llmc (the files "
                                             "are the target's: docs/abi.md lists the targets that export).")
    export.add_argument("file", metavar="FILE", help="a .llmc artifact")
    export.add_argument("directory", metavar="DIR", help="a folder to create (or an empty one)")
    export.set_defaults(run=run_export)

    cache = commands.add_parser("cache", help="show or clear the build cache",
                                description="Show where the build cache is ($LLMC_CACHE_DIR, else "
                                            "$XDG_CACHE_HOME/llmc, else ~/.cache/llmc) and what it holds.")
    cache.add_argument("--clear", action="store_true", help="delete every entry")
    cache.add_argument("--json", action="store_true")
    cache.set_defaults(run=run_cache)

    for name, helptext in (("run", "generate text from a prompt"), ("chat", "chat interactively")):
        sub = commands.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        sub.add_argument("file", help="a .llmc artifact")
        if name == "run":
            sub.add_argument("prompt")
            sub.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
        sub.add_argument("--max-new-tokens", type=int, default=256 if name == "chat" else 128)
        sub.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
        sub.add_argument("--top-k", type=int, default=0)
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--min-p", type=float, default=0.0)
        sub.add_argument("--repetition-penalty", type=float, default=1.0)
        sub.add_argument("--presence-penalty", type=float, default=0.0,
                         help="subtracted from the logit of each token generated so far (-2 to 2)")
        sub.add_argument("--frequency-penalty", type=float, default=0.0,
                         help="subtracted from a token's logit once per time it was generated (-2 to 2)")
        sub.add_argument("--seed", type=int, default=None)
        sub.add_argument("--max-context", type=int, default=None, help="KV cache capacity in positions")
        sub.set_defaults(run=run_generate if name == "run" else run_chat)

    bench = commands.add_parser("bench", help="measure prefill and decode speed",
                                description="Prefill and decode tokens/s, achieved GB/s and the share of this "
                                            "machine's measured memory bandwidth (medians of several runs).")
    bench.add_argument("file", help="a .llmc artifact")
    bench.add_argument("--prompt-tokens", default="128,512", help="prefill lengths, comma-separated")
    bench.add_argument("--decode-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--concurrency", type=int, default=None,
                       help="a load run through the engine: this many requests in flight at once")
    bench.add_argument("--requests", type=int, default=None,
                       help="requests of the load run (default: 4 per --concurrency, at least 8)")
    bench.add_argument("--max-step-tokens", type=int, default=None, help="the engine's tokens per step (load run)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--profile", action="store_true",
                       help="also print each phase's time per op kind (what LLMC_PROFILE=1 prints at exit)")
    bench.set_defaults(run=run_bench)

    serve = commands.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                                description="Serve an artifact over HTTP: /v1/chat/completions, /v1/completions, "
                                            "/v1/models, /tokenize, /detokenize, /health and Prometheus /metrics "
                                            "(needs the serve extra). SIGTERM drains: no new requests, in-flight "
                                            "ones get --shutdown-timeout seconds to finish, then exit 0.")
    serve.add_argument("file", help="a .llmc artifact")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", default=os.environ.get("LLMC_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $LLMC_API_KEY, else none)")
    serve.add_argument("--model-name", default=None, help="the model's id in the API (default: the file's name "
                                                          "without .llmc)")
    serve.add_argument("--max-running", type=int, default=None, help="sequences in one step at most")
    serve.add_argument("--max-queued", type=int, default=256, help="requests waiting to start at most; more are "
                                                                    "answered 429 (default 256)")
    serve.add_argument("--kv-blocks", type=int, default=None, help="blocks of the KV pool (default: 1 GiB of them)")
    serve.add_argument("--max-step-tokens", type=int, default=None, help="tokens in one step at most")
    serve.add_argument("--max-context", type=int, default=None, help="positions of one sequence at most")
    serve.add_argument("--threads", type=int, default=None, help="threads of the model's step")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a request may take before it ends with a 408 error (default 600; 0: none)")
    serve.add_argument("--shutdown-timeout", type=float, default=20.0,
                       help="seconds in-flight requests get to finish after SIGTERM (default 20)")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20,
                       help="largest request body; larger ones are answered 413 (default 4 MiB)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(run=run_serve)

    evaluate = commands.add_parser("eval", help="perplexity of an artifact on a text file",
                                   description="Sliding-window perplexity of an artifact on a text file.")
    evaluate.add_argument("file", help="a .llmc artifact")
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file")
    evaluate.add_argument("--context", type=int, default=256, help="tokens per window (default 256)")
    evaluate.add_argument("--stride", type=int, default=None, help="tokens a window advances (default context/2)")
    evaluate.add_argument("--by-step", action="store_true",
                          help="feed the text one token per step, as generation does (default: each window at once)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=run_eval)
    return parser


def _target_options(parser) -> None:
    """A flag per target option (``llmc.targets``), named after the options dataclasses' fields;
    one flag serves every target that declares a field of that name."""
    for name, owners in targets.option_fields().items():
        metadata = owners[0][1].metadata
        kind = targets.option_type(owners[0][1])
        said = "; ".join(f"{t}: {f.metadata.get('help', '')}" for t, f in owners) if len(owners) > 1 \
            else f"{metadata.get('help', '')} (target {owners[0][0]})"
        choices = None          # each target checks its own; the flag takes any owner's
        if all("choices" in f.metadata for _, f in owners):
            choices = list(dict.fromkeys(c for _, f in owners for c in f.metadata["choices"]))
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=said,
                            choices=choices, metavar=metadata.get("metavar"))


def _cache_option(parser, default: str | None = "on") -> None:
    parser.add_argument("--cache", default=default, choices=["on", "off", "readonly", "refresh"],
                        help="build cache policy: on (use and store entries), off (neither), readonly (use, "
                             "store nothing), refresh (rebuild everything and store it)"
                             + ("" if default else "; default: the build file's, else on"))


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)


def run_compile(args) -> int:
    from llmc.compiler import compile_model

    given = {name: getattr(args, name) for name in targets.option_fields()}
    report = compile_model(args.source, args.output, target=args.target, quant=args.quant, kv=args.kv,
                           calib=args.calib, block_size=args.block_size, cache=args.cache, progress=sys.stderr,
                           attn_implementation=args.attn, max_seq=args.context, **given)
    if args.json:
        from llmc.artifact import sha256_file

        print(json.dumps({"ok": True, "path": str(report.output), "target": args.target, "quant": report.quant,
                          "kv": report.kv, "defaults": report.defaults, "bytes": report.file_bytes,
                          "weight_bytes": report.weight_bytes,
                          "sha256": sha256_file(report.output), "seconds": round(report.seconds, 3),
                          "phases": {k: round(v, 3) for k, v in report.phases.items()}, "cache": report.cache,
                          "details": report.target}, indent=2))
        return 0
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items())
    print(f"wrote {report.output} ({report.file_bytes / 1e6:.1f} MB, weights {report.weight_bytes / 1e6:.1f} MB) "
          f"for target {args.target}, {report.quant}, KV cache {report.kv}, in {report.seconds:.1f} s ({phases})")
    if report.defaults:
        flags = {"quant": f"--quant {report.quant}", "kv": f"--kv {report.kv}"}
        print("defaults: " + "; ".join(f"{flags[k]} ({why})" for k, why in report.defaults.items()))
    if report.summary:
        print(f"{args.target} {report.summary}")
    return 0


def run_build(args) -> int:
    from llmc.build import build

    only = [name.strip() for value in args.only or [] for name in value.split(",") if name.strip()]
    result = build(args.file, cache=args.cache, only=only or None, progress=sys.stderr)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    return 0 if result.ok else 1


def run_verify(args) -> int:
    from llmc.artifact import ArtifactError
    from llmc.verify import format_result, verify_artifact

    results = []
    for path in args.files:
        try:
            results.append(verify_artifact(path))
        except ArtifactError as exc:
            results.append({"path": path, "ok": False, "error": str(exc)})
        if not args.json:
            result = results[-1]
            if result["ok"]:
                sys.stdout.write(format_result(result))
            else:
                print(f"error: {result['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


def run_export(args) -> int:
    """The artifact's target writes its files into a fresh folder beside DIR, renamed to DIR when
    all are written: an interrupted export leaves no half-written folder."""
    import shutil
    import tempfile
    from pathlib import Path

    from llmc.artifact import read_artifact

    out = Path(args.directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty folder; name a new one")
    artifact = read_artifact(args.file)
    target = targets.target_of(artifact.manifest, args.file)
    target.check_artifact(artifact)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = target.export(artifact, scratch)
        umask = os.umask(0)
        os.umask(umask)
        scratch.chmod(0o777 & ~umask)          # mkdtemp's folder is private; the export is not
        if out.exists():
            out.rmdir()
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum((out / name).stat().st_size for name in written)
    print(f"wrote {out}: {', '.join(written)} ({size / 1e6:.1f} MB)")
    return 0


def run_cache(args) -> int:
    from llmc.cache import clear, root, usage

    if args.clear:
        clear()
    parts = usage()
    if args.json:
        print(json.dumps({"path": str(root()), "parts": parts}, indent=2))
        return 0
    print(f"cache     {root()}{' (cleared)' if args.clear else ''}")
    for part in parts:
        print(f"  {part['what']:<26} {part['files']:6d} files {part['bytes'] / 1e6:10.1f} MB  {part['path']}")
    print(f"  {'total':<26} {sum(p['files'] for p in parts):6d} files "
          f"{sum(p['bytes'] for p in parts) / 1e6:10.1f} MB")
    return 0


def run_generate(args) -> int:
    import llmc

    model = llmc.load(args.file, max_context=args.max_context)
    if args.chat:
        pieces = model.chat([{"role": "user", "content": args.prompt}], stream=True, **_sampling(args))
    else:
        pieces = model.generate(args.prompt, stream=True, **_sampling(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    import llmc

    model = llmc.load(args.file, max_context=args.max_context)
    if model.tokenizer is None:
        raise LlmcError(f"{args.file} has no tokenizer, so it cannot chat")
    options = _sampling(args)
    options["max_tokens"] = options.pop("max_new_tokens")
    messages: list[dict] = []
    print("chat with the model; an empty line or end of input ends it", file=sys.stderr)
    # Through the engine, whose prefix cache keeps the conversation's blocks between turns: a
    # turn computes only what the last reply and the new message added.
    with llmc.Engine(model, kv_blocks=2 * model.layout.blocks_for(model.max_context), max_running=1) as engine:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            ids = model.tokenizer.encode(model.tokenizer.render_chat(messages))
            room = model.max_context - len(ids)
            if room < 1:
                raise LlmcError(f"the conversation fills the context of {model.max_context} positions: "
                                "start a new chat, or give --max-context a larger value")
            reply = []
            for delta in engine.submit(ids, **{**options, "max_tokens": min(options["max_tokens"], room)}):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def run_bench(args) -> int:
    import llmc
    from llmc.runtime.bench import bench, format_report

    try:
        lengths = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-tokens takes comma-separated integers, not {args.prompt_tokens!r}") from None
    if args.runs < 1 or args.decode_tokens < 1 or any(n < 1 for n in lengths):
        raise UsageError("--runs, --decode-tokens and --prompt-tokens must be positive")
    if args.concurrency is not None or args.requests is not None:
        return _load_run(args, lengths)
    model = llmc.load(args.file, max_context=max(lengths + [16 + args.decode_tokens]))
    result = bench(model, lengths, args.decode_tokens, args.runs, profile=args.profile)
    if args.profile and "profile" not in result:
        print(f"llmc bench: {args.file} has no profile marks (its target has none, or it was built before "
              "LLMC_PROFILE existed: rebuild it)", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_report(args.file, result))
    return 0


def _load_run(args, lengths: list[int]) -> int:
    import llmc
    from llmc.serve.loadrun import format_load_report, load_run

    concurrency = 1 if args.concurrency is None else args.concurrency
    requests = max(8, 4 * concurrency) if args.requests is None else args.requests
    if concurrency < 1 or requests < 1:
        raise UsageError("--concurrency and --requests must be positive")
    context = max(lengths) + args.decode_tokens
    model = llmc.load(args.file, max_context=context)
    # Enough KV blocks for every client's sequence at once: the run measures batching, not preemption.
    blocks = concurrency * model.layout.blocks_for(context)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            bar = "#" * (30 * done // total)
            sys.stderr.write(f"\r[{bar:<30}] {done}/{total} requests")
            sys.stderr.write("\n" if done == total else "")
            sys.stderr.flush()

    with llmc.Engine(model, kv_blocks=blocks, max_running=concurrency, max_queued=concurrency,
                     max_step_tokens=args.max_step_tokens) as engine:
        result = load_run(engine, lengths, args.decode_tokens, concurrency, requests, progress)
    print(json.dumps(result, indent=2) if args.json else format_load_report(args.file, result))
    return 0


def run_serve(args) -> int:
    from pathlib import Path

    from llmc.serve.http import serve

    for name in ("max_running", "kv_blocks", "max_step_tokens", "max_context", "threads", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {value}")
    if args.max_queued < 1:
        raise UsageError(f"--max-queued must be at least 1, not {args.max_queued}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be from 0 to 65535, not {args.port}")
    if args.request_timeout < 0 or args.shutdown_timeout < 0:
        raise UsageError("--request-timeout and --shutdown-timeout must be >= 0")
    engine = dict(kv_blocks=args.kv_blocks, max_running=args.max_running, max_queued=args.max_queued,
                  max_step_tokens=args.max_step_tokens)
    name = args.model_name or Path(args.file).name.removesuffix(".llmc")
    return serve(args.file, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                 access_log=args.access_log, model_name=name,
                 api_key=args.api_key or None, request_timeout=args.request_timeout or None,
                 max_body_bytes=args.max_body_bytes, engine_options=engine,
                 load_options=dict(max_context=args.max_context, threads=args.threads))


def run_eval(args) -> int:
    from pathlib import Path

    import llmc
    from llmc.runtime.evaluate import perplexity

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmcError(f"cannot read the text {args.text}: {exc}") from None
    model = llmc.load(args.file, max_context=args.context)
    if model.tokenizer is None:
        raise LlmcError(f"{args.file} has no tokenizer, so it cannot read a text")
    result = perplexity(model, model.tokenizer.encode(text), args.context, args.stride, by_step=args.by_step)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens, "context": result.context,
                          "stride": result.stride, "quantization": model.manifest["quantization"]}))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens of {args.text} "
              f"(context {result.context}, stride {result.stride}, {model.manifest['quantization']}) "
              f"in {result.seconds:.1f} s")
    return 0


def _is_artifact(path: str) -> bool:
    from llmc.artifact import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def inspect_artifact(path: str) -> int:
    from llmc import abi
    from llmc.artifact import read_artifact
    from llmc.verify import describe_requirements

    art = read_artifact(path)
    m = art.manifest
    abi.check_manifest(m, path)
    targets.target_of(m, path).check_artifact(art)
    model = m["model"]
    config = model.get("config")
    config = config if isinstance(config, dict) else {}
    out = sys.stdout
    out.write(f"artifact  {path} (format {m['format_version']}, llmc {m.get('llmc_version')})\n")
    target = m["target"]
    out.write(f"target    {target['name']}: {target.get('executor', '')}\n")
    for line in targets.target_of(m, path).describe(art):
        out.write(line + "\n")
    out.write(f"requires  {describe_requirements(m)}\n")
    described = ": " + _describe_config(config) if config else ""
    out.write(f"model     {model.get('source')} ({model.get('kind')}){described}\n")
    out.write(f"quant     {m.get('quantization')}, context <= {model['max_seq']}\n")
    for line in abi.describe(m):
        out.write(line + "\n")
    tok = m.get("tokenizer")
    out.write(f"tokenizer {'yes' if tok else 'none (token ids only)'}"
              f"{', chat template' if tok and tok.get('chat_template') else ''}\n")
    for name, entry in m["sections"].items():
        out.write(f"section   {name:<10} {entry['size'] / 1e6:10.2f} MB  sha256 {entry['sha256'][:16]}\n")
    for name, digest in m.get("inputs", {}).items():
        out.write(f"input     {name}  sha256 {digest[:16]}\n")
    return 0


def run_inspect(args) -> int:
    from llmc.pipeline import run_pipeline

    if _is_artifact(args.source):
        return inspect_artifact(args.source)
    result = run_pipeline(args.source, until=args.after, dump_ir=args.dump_ir, attn_implementation=args.attn)
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
