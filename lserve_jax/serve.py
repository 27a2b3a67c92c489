"""`python -m lserve_jax.serve`: an OpenAI-compatible HTTP server on the engine loop (thin CLI).

    python -m lserve_jax.serve --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}'

The routes are in `lserve_jax/server/api.py`, the engine thread in `lserve_jax/server/loop.py`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .generate import add_engine_options, engine_options, engine_settings

DESCRIPTION = """\
Serve a converted checkpoint (default: the default model) over OpenAI's HTTP API:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent
events), GET /health, GET /metrics (Prometheus). SIGINT/SIGTERM stop admitting, abort the
requests in flight and exit 0.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lserve_jax.serve", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", help="the model id clients see (default: the checkpoint's directory name)")
    p.add_argument("--max-slots", type=int, default=8, help="decode slots: requests run together (default 8)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default 256)")
    p.add_argument("--warmup", action="store_true", help="compile every prefill bucket and the decode step first")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    add_engine_options(p)
    return p


def build_server(engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "lserve_jax",
                 max_queue: int = 256, log_level: str = "info"):
    """A uvicorn.Server for `engine` (not started: `.run()` it, or run it on a thread as the tests
    do). Its signal handling stops admitting and aborts in-flight requests before uvicorn drains
    the connections, and does not re-raise the signal, so the process exits 0."""
    import uvicorn

    from .server import create_app

    app = create_app(engine, model_name=model_name, max_queue=max_queue)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.loop.shutdown()  # streams in flight end now (finish_reason "abort")
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level == "debug")
    server = Server(config)
    server.app = app
    return server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sparse = engine_settings(args)
        if args.max_slots < 1:
            raise ValueError(f"--max-slots must be >= 1, got {args.max_slots}")
        if args.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from .api import load
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .heads import PatternError
    from .sharding import ShardingError
    from .tokenizer import TokenizerError

    try:
        engine = load(args.checkpoint, pattern=None if args.pattern == "none" else args.pattern, sparse=sparse,
                      dtype=args.dtype, max_seq_len=args.max_seq_len, num_pages=args.num_pages, tp=args.tp,
                      max_slots=args.max_slots, **engine_options(args))
        if engine.tokenizer is None:
            raise CheckpointError("this checkpoint has no tokenizer.json; the server needs one")
        if args.warmup:
            engine.warmup()
    except (CheckpointError, ConfigError, PatternError, ShardingError, TokenizerError, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.model_name:
        name = args.model_name
    elif args.checkpoint:
        name = Path(args.checkpoint).resolve().name
    else:
        from .api import DEFAULT_CHECKPOINT_DIRNAME

        name = DEFAULT_CHECKPOINT_DIRNAME.removesuffix("-lserve")
    server = build_server(engine, host=args.host, port=args.port, model_name=name, max_queue=args.max_queue,
                          log_level=args.log_level)
    assert threading.current_thread() is threading.main_thread()
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
