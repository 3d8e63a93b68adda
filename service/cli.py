"""Command line: `python -m service serve`, `serve-ray`, `make-adapter`, and the client commands `adapters` and
`generate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adapter_client.cli import CLIENT_COMMANDS, add_client_commands, run_client_command

from .settings import Settings

SERVE_FLAGS = ("model", "store", "host", "port", "device", "dtype", "max_upload_bytes", "max_batch_size",
               "max_waiting_requests", "prefill_token_budget", "request_timeout_s", "max_resident_adapters",
               "max_adapters", "max_adapter_rank", "max_prompt_tokens", "max_new_tokens", "max_request_body_bytes",
               "max_prompts_per_request", "max_chat_messages", "public_health_details", "lora_roots", "adapters",
               "log_json", "api_keys_file", "log_level")
RAY_FLAGS = ("ray_address", "num_replicas", "max_adapters_per_replica", "replica_num_cpus", "replica_num_gpus",
             "replica_lease_s", "replica_retries")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="PEFT adapter serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (every flag also settable as ADAPTER_SERVICE_<FLAG>)")
    _add_serve_flags(serve)
    ray_serve = sub.add_parser("serve-ray", help="run on Ray Serve: replicas multiplexing adapters over a shared store "
                               "(needs the [distributed] extra; see docs/deploy.md)")
    _add_serve_flags(ray_serve)
    ray_serve.add_argument("--ray-address", dest="ray_address", help="cluster to join (default: start a local one)")
    ray_serve.add_argument("--num-replicas", dest="num_replicas", type=int)
    ray_serve.add_argument("--max-adapters-per-replica", dest="max_adapters_per_replica", type=int)
    ray_serve.add_argument("--replica-num-cpus", dest="replica_num_cpus", type=float)
    ray_serve.add_argument("--replica-num-gpus", dest="replica_num_gpus", type=float)
    ray_serve.add_argument("--replica-lease-s", dest="replica_lease_s", type=float)
    ray_serve.add_argument("--replica-retries", dest="replica_retries", type=int)
    make = sub.add_parser("make-adapter", help="write a valid PEFT-format LoRA adapter for the demo model")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--rank", type=int, default=8)
    make.add_argument("--modules-to-save", dest="modules_to_save", nargs="*", default=[])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--model", help="model directory the adapter is for (default: the demo model)")
    add_client_commands(sub)
    return parser


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local model directory or hub id (default: embedded demo model)")
    parser.add_argument("--store", help="adapter store directory (default: adapters_store)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int)
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    parser.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=int)
    parser.add_argument("--prefill-token-budget", dest="prefill_token_budget", type=int)
    parser.add_argument("--request-timeout-s", dest="request_timeout_s", type=float)
    parser.add_argument("--max-resident-adapters", dest="max_resident_adapters", type=int)
    for flag in ("max-adapters", "max-adapter-rank", "max-prompt-tokens", "max-new-tokens", "max-request-body-bytes",
                 "max-prompts-per-request", "max-chat-messages"):
        parser.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int)
    parser.add_argument("--lora-root", dest="lora_roots", action="append", type=Path,
                        help="directory POST /v1/load_lora_adapter may load from (repeatable)")
    parser.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=SOURCE",
                        help="register an adapter at start-up (repeatable; vLLM's --lora-modules): SOURCE is "
                             "hf://org/repo[@rev], org/repo, s3://bucket/prefix or a directory under a --lora-root")
    parser.add_argument("--log-json", dest="log_json", action="store_true", default=None, help="JSON log lines")
    parser.add_argument("--api-keys-file", dest="api_keys_file", type=Path,
                        help="file of '<scope> <key>' lines (scopes: admin, inference); also ADAPTER_SERVICE_API_KEYS")
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--public-health-details", dest="public_health_details",
                        action=argparse.BooleanOptionalAction, default=None,
                        help="adapter names in /health and /metrics for callers without a key (default: only "
                        "when no API keys are set)")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        sys.exit(run_client_command(args))
    if args.command == "serve":
        settings = Settings(**{k: v for k in SERVE_FLAGS if (v := getattr(args, k)) is not None})
        _serve(settings)
    elif args.command == "serve-ray":
        settings = Settings(**{k: v for k in SERVE_FLAGS + RAY_FLAGS if (v := getattr(args, k)) is not None})
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
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_keys or settings.api_keys_file):
        logging.getLogger(__name__).warning(
            "SERVING ON %s WITHOUT API KEYS: anyone who can reach this address can upload, delete and run "
            "adapters. Set ADAPTER_SERVICE_API_KEYS or --api-keys-file.", settings.host)
    try:
        run(create_app(settings), sock, settings.log_level)
    finally:
        lock.release()


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
