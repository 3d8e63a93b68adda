"""Throughput with a CPU hog beside the server, on the same cores (a noisy neighbour, or a CPU quota).

    python -m bench.cpu_contention [--repo DIR] [--env KEY=VALUE ...] [--clients 8] [--requests 3]

Starts the server the default way on the 58M benchmark model, runs `clients` concurrent clients that each send
`requests` greedy /generate requests of 32 new tokens to the base model, first alone, then with one busy-loop
process per available CPU running beside it. Prints generated tokens/s both ways and their ratio. `--repo`
runs another checkout's server (to compare with an older version); `--env` adds server environment variables.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .memory_cycles import start_server
from .model import ensure_model

BENCH_DIR = Path(__file__).resolve().parent
NEW_TOKENS = 32


def _spin() -> None:
    while True:
        pass


def _load(url: str, clients: int, requests: int) -> float:
    """Generated tokens per second for the whole load."""
    def client(index: int) -> int:
        tokens = 0
        with httpx.Client(base_url=url, timeout=600) as c:
            for r in range(requests):
                body = {"prompt": f"client {index} request {r}: once upon a time", "max_new_tokens": NEW_TOKENS,
                        "ignore_eos": True, "adapter_id": "base"}
                reply = c.post("/generate", json=body)
                reply.raise_for_status()
                tokens += len(reply.json()["token_ids"])
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--repo", type=Path, default=BENCH_DIR.parent)
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    model_dir = ensure_model(args.cache_dir)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.repo.resolve(), model_dir, Path(tmp) / "store", env)
        try:
            _load(url, args.clients, 1)  # warm-up
            alone = _load(url, args.clients, args.requests)
            hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in os.sched_getaffinity(0)]
            for hog in hogs:
                hog.start()
            try:
                contended = _load(url, args.clients, args.requests)
            finally:
                for hog in hogs:
                    hog.terminate()
                    hog.join()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"repo {args.repo}, env {env or 'default'}: alone {alone:.0f} tok/s, with {len(hogs)} CPU hog(s) "  # noqa: T201
          f"{contended:.0f} tok/s ({alone / contended:.1f}x slower)")


if __name__ == "__main__":
    main()
