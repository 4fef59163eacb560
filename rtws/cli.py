"""Command line: ``rtws serve`` and ``rtws chat``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .config import ServerConfig, _base_type, field_type, parse_value


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(field_type(f.name))
        default = f.default if f.default is not None else "none"
        help_text = f"{f.metadata.get('help', '')} [env RTWS_{f.name.upper()}; default: {default!r}]"
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                           type=_parser_for(f.name), help=help_text)


def _parser_for(name: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return parse_value(name, field_type(name), raw)
        except ValueError as exc:  # argparse turns this into a clean usage error
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtws", description="Real-time LLM session server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve a model over WebSocket and HTTP",
        description="Serve a model. Precedence: flags > RTWS_* environment variables > defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(serve)
    serve_ray = sub.add_parser(
        "serve-ray", help="serve on Ray Serve: N engine replicas behind one endpoint (pip install 'rtws[ray]')",
        description="Serve on Ray Serve (docs/scale-out.md). Same configuration as 'rtws serve', per replica.",
    )
    _add_config_flags(serve_ray)
    from .ray_cli import add_flags as add_ray_flags

    add_ray_flags(serve_ray)
    chat = sub.add_parser("chat", help="chat with a running server from the terminal")
    chat.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/ws", help="server WebSocket URL")
    chat.add_argument("--token", default=None, help="API key (or RTWS_TOKEN)")
    chat.add_argument("--model", default=None, help="model name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        explicit: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            config = ServerConfig.from_sources(explicit)
        except ValueError as exc:
            print(f"rtws serve: invalid configuration: {exc}", file=sys.stderr)
            return 2
        from .server import serve

        return serve(config)
    if args.command == "serve-ray":
        from .ray_cli import main as serve_ray_main

        return serve_ray_main(args, {k: v for k, v in vars(args).items()
                                     if k != "command" and not k.startswith("ray_")})
    if args.command == "chat":
        from .chat import main as chat_main

        return chat_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
