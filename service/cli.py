"""Command line: `python -m service serve`, `make-adapter`, and the client commands `adapters` and `generate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli_client import CLIENT_COMMANDS, add_client_commands, run_client_command
from .settings import Settings

SERVE_FLAGS = ("model", "store", "host", "port", "device", "dtype", "max_upload_bytes", "max_batch_size",
               "max_waiting_requests", "prefill_token_budget", "request_timeout_s", "max_resident_adapters",
               "max_adapters", "max_adapter_rank", "max_prompt_tokens", "max_new_tokens", "max_request_body_bytes",
               "lora_roots", "log_json", "api_keys_file", "log_level")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="PEFT adapter serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (every flag also settable as ADAPTER_SERVICE_<FLAG>)")
    serve.add_argument("--model", help="local model directory or hub id (default: embedded demo model)")
    serve.add_argument("--store", help="adapter store directory (default: adapters_store)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int)
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    serve.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=int)
    serve.add_argument("--prefill-token-budget", dest="prefill_token_budget", type=int)
    serve.add_argument("--request-timeout-s", dest="request_timeout_s", type=float)
    serve.add_argument("--max-resident-adapters", dest="max_resident_adapters", type=int)
    for flag in ("max-adapters", "max-adapter-rank", "max-prompt-tokens", "max-new-tokens", "max-request-body-bytes"):
        serve.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int)
    serve.add_argument("--lora-root", dest="lora_roots", action="append", type=Path,
                       help="directory POST /v1/load_lora_adapter may load from (repeatable)")
    serve.add_argument("--log-json", dest="log_json", action="store_true", default=None, help="JSON log lines")
    serve.add_argument("--api-keys-file", dest="api_keys_file", type=Path,
                       help="file of '<scope> <key>' lines (scopes: admin, inference); also ADAPTER_SERVICE_API_KEYS")
    serve.add_argument("--log-level", dest="log_level")
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
    if args.command == "serve":
        settings = Settings(**{k: v for k in SERVE_FLAGS if (v := getattr(args, k)) is not None})
        _serve(settings)
    else:
        _make_adapter(args)


def _serve(settings: Settings) -> None:
    import uvicorn

    from .api.app import create_app
    from .logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_keys or settings.api_keys_file):
        logging.getLogger(__name__).warning(
            "SERVING ON %s WITHOUT API KEYS: anyone who can reach this address can upload, delete and run "
            "adapters. Set ADAPTER_SERVICE_API_KEYS or --api-keys-file.", settings.host)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, log_config=None)  # our middleware logs each request with its id


def _make_adapter(args: argparse.Namespace) -> None:
    from .demo_model import ensure_demo_model
    from .make_adapter import write_demo_adapter

    model_dir = Path(args.model) if args.model else ensure_demo_model(Settings().demo_cache)
    out = write_demo_adapter(args.out, model_dir, rank=args.rank, modules_to_save=list(args.modules_to_save),
                             seed=args.seed)
    logging.getLogger(__name__).info("wrote adapter to %s", out)
    print(out)  # noqa: T201 - the CLI's output is the path
