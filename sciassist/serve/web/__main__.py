"""python -m sciassist.serve.web: serve the chat page and API for one checkpoint.

Binds 127.0.0.1 by default: there is no authentication, so exposing it (--host 0.0.0.0)
is a deliberate choice, and it prints a warning when made.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from sciassist.serve.chat_cli import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, TUTOR_SYSTEM_PROMPT
from sciassist.checkpoints import add_checkpoint_args, load_model_for_cli
from sciassist.serve.web.server import ServerSettings, create_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sciassist.serve.web", description="Chat with a checkpoint in the browser."
    )
    add_checkpoint_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--system", default=TUTOR_SYSTEM_PROMPT, help='system prompt (default: the science tutor; "" for none)'
    )
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="default when a request gives none"
    )
    parser.add_argument("--top_k", type=int, default=DEFAULT_TOP_K, help="default when a request gives none")
    parser.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default when a request gives none")
    parser.add_argument("--seed", type=int, default=None, help="sample every answer with this seed (reproducible)")
    parser.add_argument("--max_pending", type=int, default=4, help="generations running + waiting; more get HTTP 429")
    parser.add_argument(
        "--allow_origin", action="append", default=[], help="allow this origin cross-site (CORS); repeatable"
    )
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0 or not 1 <= args.top_k <= 200 or not 1 <= args.max_tokens <= 4096:
        parser.error("defaults must respect the API limits: temperature 0..2, top_k 1..200, max_tokens 1..4096")
    if args.max_pending < 1:
        parser.error("--max_pending must be >= 1")
    loaded = load_model_for_cli(args)
    if loaded is None:
        return 2
    settings = ServerSettings(
        system_prompt=args.system or None,
        temperature=args.temperature,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        max_pending=args.max_pending,
        allow_origins=args.allow_origin,
    )
    app = create_app(loaded, settings)
    if not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host}: anyone who can reach it can use the model (no authentication)",
            file=sys.stderr,
        )
    print(f"SciAssist chat: {loaded.choice.describe()} -> http://{args.host}:{args.port}/", file=sys.stderr)
    import uvicorn

    # A bounded graceful shutdown: Ctrl-C should not wait for a long answer to finish.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
