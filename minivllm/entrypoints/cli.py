"""`minivllm serve MODEL [flags]`: the OpenAI-compatible server; `minivllm run-batch -i IN.jsonl -o OUT.jsonl --model
MODEL [flags]`: an OpenAI batch file answered offline (also `python -m minivllm serve|run-batch ...`)."""

import argparse
import gc
import logging
import signal
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minivllm", description="minivllm's command line.")
    commands = p.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP with the OpenAI API",
                                description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model", help="checkpoint dir, cached repo id or preset")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all but /health and "
                        "/metrics)")
    server.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL as "
                        "given)%(default).0s")
    server.add_argument("--chat-template", default=None, help="a Jinja chat template (or its file) instead of the "
                        "tokenizer's")
    server.add_argument("--max-pending-requests", type=positive_int, default=1024, metavar="N",
                        help="requests in flight (running or waiting) beyond which new ones get 503")
    server.add_argument("--max-request-bytes", type=positive_int, default=8 << 20, metavar="N",
                        help="the largest request body accepted (413 beyond)")
    server.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="S",
                        help="on SIGTERM, seconds to let requests in flight finish before aborting them")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_flags(serve)
    add_run_batch(commands)
    return p


def add_engine_flags(command: argparse.ArgumentParser) -> None:
    """The LLM's arguments as flags (ENGINE_FLAGS names them), shared by every command that builds an engine."""
    engine = command.add_argument_group("engine")
    engine.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)%(default).0s")
    engine.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)"
                        "%(default).0s")
    engine.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    engine.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the "
                        "model's)%(default).0s")
    engine.add_argument("--max-num-seqs", type=positive_int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--num-kv-blocks", type=positive_int, default=None, help="KV-cache size in blocks (default: "
                        "from --gpu-memory-utilization)%(default).0s")
    engine.add_argument("--tensor-parallel-size", type=positive_int, default=1)
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--block-size", type=positive_int, default=16)
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)


def add_run_batch(commands) -> None:
    batch = commands.add_parser("run-batch", help="answer an OpenAI batch file (JSONL) offline",
                                description="Answer an OpenAI batch file (one request a line) as the server would, "
                                "in one engine or over Ray replicas.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    batch.add_argument("-i", "--input-file", required=True, metavar="INPUT.jsonl",
                       help="one request a line: custom_id, method, url (/v1/completions, /v1/chat/completions), "
                       "body%(default).0s")
    batch.add_argument("-o", "--output-file", required=True, metavar="OUTPUT.jsonl",
                       help="one answer a line, in input order: id, custom_id, response, error%(default).0s")
    batch.add_argument("--model", required=True, help="checkpoint dir, cached repo id or preset%(default).0s")
    batch.add_argument("--served-model-name", default=None, help="the model's name in the bodies (default: MODEL "
                       "as given)%(default).0s")
    batch.add_argument("--chat-template", default=None, help="a Jinja chat template (or its file) instead of the "
                       "tokenizer's")
    batch.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                       help="engines to spread the lines over: 1 runs in this process; more are Ray actors "
                       "(pip install 'minivllm[ray]'), each holding --tensor-parallel-size GPUs on GPUs")
    batch.add_argument("--ray-address", default=None, metavar="ADDR", help="the Ray cluster to run the replicas on "
                       "(default: a local one started for the run; 'auto': the one this machine is in)%(default).0s")
    batch.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_flags(batch)


ENGINE_FLAGS = ("tokenizer", "device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "gpu_memory_utilization", "num_kv_blocks", "tensor_parallel_size", "enforce_eager", "block_size",
                "seed", "enable_prefix_caching")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ENGINE_FLAGS}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run-batch":
        from minivllm.entrypoints.run_batch import run_batch

        return run_batch(args)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    import uvicorn  # after parsing: --help and bad flags answer at once

    from minivllm.async_llm import AsyncLLM
    from minivllm.entrypoints.api_server import ServerSettings, build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # AsyncLLM's thread that reads the engine's step messages needs the GIL while the event loop is busy with many
    # streams; at Python's default 5 ms switch interval each of its reads may wait that long (about 250 step
    # messages/s at most against a saturated loop, measured on a CPU), at 1 ms it kept up with 800 a second
    sys.setswitchinterval(0.001)
    try:
        engine = AsyncLLM(args.model, **engine_kwargs(args))
    except (ValueError, TypeError) as e:
        print(f"minivllm serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    settings = ServerSettings(served_model_name=args.served_model_name or args.model, model=args.model,
                              api_key=args.api_key, max_pending_requests=args.max_pending_requests,
                              max_request_bytes=args.max_request_bytes, chat_template=args.chat_template)
    # uvloop and httptools, as vLLM serves: the loop and HTTP layer in C, not asyncio's and h11's Python, for every
    # chunk of every stream (named, not "auto", so that a missing one fails at start instead of serving slower)
    config = uvicorn.Config(build_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False, loop="uvloop",
                            http="httptools")
    server = uvicorn.Server(config)
    # what start-up built (torch, transformers, the tokenizer: some 480k objects) lives as long as the process: its
    # garbage collected, the rest frozen out of the collector's sight, so that a full collection while serving
    # traverses only what serving made (vLLM's server does the same). Unfrozen, one came in the middle of the CPU
    # recipe's load (benchmarks/NOTES_engine.md) and took 0.48 s, every stream paused: 12 us of CPU a token there
    gc.collect()
    gc.freeze()
    # uvicorn re-raises the SIGTERM it shut down on once it has; this handler takes it, so a requested stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
