"""Command line (`adapter-service` or `python -m service`): `serve`, `serve-ray`, `make-adapter`, and the client
commands `adapters`, `generate` and `health`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from adapter_client.cli import CLIENT_COMMANDS, add_client_commands, add_connection_flags, run_client_command

from .serve_flags import RAY_FLAGS, SERVE_FLAGS, SettingsInputError, add_settings_flags, settings_from_args
from .settings import Settings

__all__ = ["RAY_FLAGS", "SERVE_FLAGS", "main"]

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter-service", description="PEFT adapter serving: `serve` starts the "
                                     "server; `adapters`, `generate` and `health` talk to a running one")
    add_connection_flags(parser)  # the client commands' --url/--api-key may also come first
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (every flag also settable as ADAPTER_SERVICE_<FLAG>)",
                           description="Start the HTTP server. Every flag is also an environment variable: "
                                       "ADAPTER_SERVICE_<FLAG> in capitals with underscores (--max-new-tokens: "
                                       "ADAPTER_SERVICE_MAX_NEW_TOKENS); repeatable flags take a JSON list or "
                                       "comma-separated values there. API keys: ADAPTER_SERVICE_API_KEYS or "
                                       "--api-keys-file.")
    add_settings_flags(serve, SERVE_FLAGS)
    ray_serve = sub.add_parser("serve-ray", help="run on Ray Serve: replicas multiplexing adapters over a shared store "
                               "(needs the [distributed] extra; see docs/deploy.md)")
    add_settings_flags(ray_serve, SERVE_FLAGS + RAY_FLAGS)
    make = sub.add_parser("make-adapter", help="write a valid PEFT-format LoRA adapter for the demo model")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--rank", type=int, default=8)
    make.add_argument("--modules-to-save", dest="modules_to_save", nargs="*", default=[])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--model", help="model directory the adapter is for (default: the demo model)")
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        sys.exit(run_client_command(args))
    if args.command in ("serve", "serve-ray"):
        try:
            settings = settings_from_args(args, SERVE_FLAGS if args.command == "serve" else SERVE_FLAGS + RAY_FLAGS)
        except SettingsInputError as exc:
            sys.exit(f"error: {exc}")
        if (problem := settings.model_source_problem()) is not None:
            sys.exit(f"error: {problem}")
        if args.command == "serve":
            _serve(settings)
        else:
            _serve_ray(settings)
    else:
        _make_adapter(args)


def _serve(settings: Settings) -> None:
    """Take the store's lock, bind the port, then build the app (its lifespan loads the model and the store).

    Each of the first two steps fails in about a second with one line on stderr, before anything heavy runs
    and before the store is touched: a second server on the same store must not clean up the first one's
    uploads, and a busy port must not cost a model load first.
    """
    from .api.server import listen, run
    from .errors import StartupFailure
    from .store_lock import StoreLock, StoreLockedError

    try:
        lock = StoreLock(settings.store).acquire()  # held until the process exits
    except StoreLockedError as exc:
        sys.exit(f"error: {exc.message}; stop it first, or serve another --store")
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        sys.exit(f"error: cannot listen on {settings.host}:{settings.port}: {(exc.strerror or str(exc)).lower()}")

    from .api.app import create_app
    from .logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    _create_api_key(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_keys or settings.api_keys_file):
        logging.getLogger(__name__).warning(
            "SERVING ON %s WITHOUT API KEYS: anyone who can reach this address can upload, delete and run "
            "adapters. Set ADAPTER_SERVICE_API_KEYS or --api-keys-file.", settings.host)
    try:
        run(create_app(settings), sock, settings.log_level)
    except StartupFailure as exc:  # the model or a start-up adapter: one line, no traceback
        sys.exit(f"error: {exc}")
    finally:
        lock.release()


def _create_api_key(settings: Settings) -> None:
    """With --create-api-key and no keys set: a keys file with one new admin key, the key logged once.

    The Docker image listens on every interface of its container, so it must not run an open API; a key made
    on the first start and kept on the volume lets `docker compose up` work on a fresh machine all the same.
    """
    path = settings.api_keys_file
    if not settings.create_api_key or settings.api_keys or path is None or path.exists():
        return
    import secrets

    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(f"# created by `serve --create-api-key`; one '<scope> <key>' per line (scopes: admin, inference)\n"
                f"admin {key}\n")
    logging.getLogger(__name__).warning(
        "created an admin API key in %s (send it as 'Authorization: Bearer <key>'; the CLI reads "
        "ADAPTER_SERVICE_API_KEY): %s", path, key)


def _serve_ray(settings: Settings) -> None:
    from .logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    try:
        from .distributed.app import run
    except ImportError as exc:
        sys.exit(f"serve-ray needs Ray Serve: pip install -e '.[distributed]' ({exc})")
    run(settings)


def _make_adapter(args: argparse.Namespace) -> None:
    from .devtools.demo_model import ensure_demo_model
    from .devtools.make_adapter import write_demo_adapter

    model_dir = Path(args.model) if args.model else ensure_demo_model(Settings().demo_cache)
    out = write_demo_adapter(args.out, model_dir, rank=args.rank, modules_to_save=list(args.modules_to_save),
                             seed=args.seed)
    logging.getLogger(__name__).info("wrote adapter to %s", out)
    print(out)  # noqa: T201 - the CLI's output is the path
