"""``tokenhub-sidecar``: serve, demo, check, usage, ledger verify. ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import config
from .config import ConfigError, Settings

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"tokenhub-sidecar: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tokenhub-sidecar",
        description="A local OpenAI-compatible sidecar: stored keys, hard bounds, failover, "
        "a response cache and an append-only cost ledger.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("-c", "--config", type=Path, help="config file (TOML)")
    demo = commands.add_parser("demo", help="run the daemon with built-in demo providers")
    demo.add_argument("--listen", default="127.0.0.1:8700", help="address to listen on")
    demo.add_argument("--ledger", default="./demo-ledger.jsonl", help="ledger file")
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", type=Path, help="config file (TOML)")
    usage = commands.add_parser("usage", help="sum the ledger")
    usage.add_argument("--ledger", type=Path, help="ledger file (default: the config's)")
    usage.add_argument("-c", "--config", type=Path, help="config to take the ledger path from")
    usage.add_argument("--since", help="first day (YYYY-MM-DD, UTC) or ISO timestamp")
    usage.add_argument("--until", help="last day (YYYY-MM-DD, UTC, inclusive) or ISO timestamp")
    usage.add_argument("--by", default="", help="group by any of day,model,provider,outcome")
    usage.add_argument("--format", default="table", choices=["table", "json", "csv"])
    ledger = commands.add_parser("ledger", help="ledger tools")
    ledger_commands = ledger.add_subparsers(
        dest="ledger_command", required=True, parser_class=_Parser
    )
    verify = ledger_commands.add_parser("verify", help="check every line and the hash chain")
    verify.add_argument("--ledger", type=Path, help="ledger file (default: the config's)")
    verify.add_argument("-c", "--config", type=Path, help="config to take the ledger path from")
    return parser


def _fail(message: str) -> int:
    print(f"tokenhub-sidecar: {message}", file=sys.stderr)
    return EXIT_USAGE


def _load(path: Path | None) -> Settings:
    return config.load(path or config.default_config_path())


def _ledger_path(args: argparse.Namespace) -> Path:
    if args.ledger is not None:
        return Path(args.ledger)
    return _load(args.config).ledger.path


def _cmd_check(args: argparse.Namespace) -> int:
    path = args.config or config.default_config_path()
    settings = config.load(path)
    models = {m for p in settings.providers for m in p.models}
    print(
        f"{path}: ok ({len(settings.providers)} providers, {len(models)} models, "
        f"{len(settings.aliases)} aliases)"
    )
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import daemon, log

    path = args.config or config.default_config_path()
    settings = config.load(path)
    from .app import redactor_for

    writer = log.configure(
        format=settings.log.format,
        level=settings.log.level,
        redactor=redactor_for(settings),
        background=True,
    )
    try:
        return _run_loop(daemon.run(settings, config_path=path, log_writer=writer))
    finally:
        if writer is not None:
            writer.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.launch import run_demo

    config.parse_listen(args.listen)
    return _run_loop(run_demo(listen=args.listen, ledger=args.ledger))


def _run_loop(coro: object) -> int:
    from .daemon import StartupError

    _install_uvloop()
    try:
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cmd_usage(args: argparse.Namespace) -> int:
    from .usage import cmd_usage

    by = [part.strip() for part in args.by.split(",") if part.strip()]
    return cmd_usage(
        _ledger_path(args),
        since=args.since,
        until=args.until,
        by=by,
        fmt=args.format,
        out=sys.stdout,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from .usage import cmd_verify

    return cmd_verify(_ledger_path(args), out=sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "serve": _cmd_serve,
        "demo": _cmd_demo,
        "check": _cmd_check,
        "usage": _cmd_usage,
        "ledger": _cmd_verify,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        return _fail(str(exc))
    except Exception as exc:  # the last line of defence: one line, never a traceback
        print(
            f"tokenhub-sidecar: unexpected {type(exc).__name__}: {exc} "
            "(this is a bug; please report it with the command you ran)",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
