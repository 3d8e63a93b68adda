"""Throughput with a CPU hog beside the server, on the same cores (a noisy neighbour, or a CPU quota).

    python -m bench.cpu_contention [--repo DIR] [--env KEY=VALUE ...] [--clients 8] [--requests 3] [--cpu-quota N]

Starts the server the default way on the 58M benchmark model, runs `clients` concurrent clients that each send
`requests` greedy /generate requests of 32 new tokens to the base model, first alone, then with one busy-loop
process per available CPU running beside it. Prints generated tokens/s both ways and their ratio. `--repo`
runs another checkout's server (to compare with an older version); `--env` adds server environment variables;
`--cpu-quota N` runs the server in a new cgroup (v1 cpu controller, needs root) whose quota is N CPUs, as a
container started with `--cpus N` (the hogs then run outside it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from .memory_cycles import start_server
from .model import ensure_model

BENCH_DIR = Path(__file__).resolve().parent
NEW_TOKENS = 32
CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")


def _spin() -> None:
    while True:
        pass


@contextmanager
def _quota_wrapper(cpus: float | None) -> Iterator[list[str]]:
    """A command prefix that runs its command in a fresh cgroup limited to `cpus` CPUs (none: no prefix)."""
    if cpus is None:
        yield []
        return
    group = CPU_CONTROLLER / f"bench-cpu-contention-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        yield ["sh", "-c", f'echo $$ > {group}/tasks && exec "$@"', "sh"]
    finally:
        for pid in (group / "tasks").read_text().split():  # the server has exited by now; move any straggler
            (CPU_CONTROLLER / "tasks").write_text(pid)
        group.rmdir()


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
    parser.add_argument("--cpu-quota", type=float, default=None, help="run the server in a cgroup of N CPUs")
    args = parser.parse_args()
    model_dir = ensure_model(args.cache_dir)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp, _quota_wrapper(args.cpu_quota) as wrapper:
        proc, url = start_server(args.repo.resolve(), model_dir, Path(tmp) / "store", env, wrapper)
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
    quota = f", cgroup quota {args.cpu_quota} CPU" if args.cpu_quota else ""
    print(f"repo {args.repo}, env {env or 'default'}{quota}: alone {alone:.0f} tok/s, with {len(hogs)} CPU hog(s) "  # noqa: T201
          f"{contended:.0f} tok/s ({alone / contended:.1f}x slower)")


if __name__ == "__main__":
    main()
