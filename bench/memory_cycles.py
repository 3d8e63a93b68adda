"""Memory given back: VmRSS of a real server over upload/delete cycles of a large adapter.

    python -m bench.memory_cycles [--cycles 12] [--env MALLOC_MMAP_THRESHOLD_=131072] [--repo DIR]

Starts the server the default way (`python -m service serve --model M --store S`), then per cycle uploads an
adapter holding trained copies of `lm_head` and `embed_tokens` (the benchmark model's, 62.5 MiB each as float32)
plus a rank-16 LoRA, runs one generation with it, deletes it, and reads the server's VmRSS from /proc. Prints a
Markdown table. `--repo` runs another checkout's server (to compare with an older version); `--env` adds
environment variables to the server's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import torch

from .model import ensure_model

BENCH_DIR = Path(__file__).resolve().parent
READY = re.compile(r"Uvicorn running on (http://[\w.\-]+:\d+)")


def ensure_big_adapter(cache_dir: Path, model_dir: Path) -> Path:
    """A PEFT adapter with modules_to_save lm_head and embed_tokens (built once)."""
    out = cache_dir / "big-adapter"
    if (out / "adapter_model.safetensors").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head", "embed_tokens"])
    model = get_peft_model(base, config)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        model.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else None
        Path(tmp).mkdir(exist_ok=True)  # TemporaryDirectory removes it again
    return out


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(repo: Path, model_dir: Path, store: Path, env: dict[str, str],
                 wrapper: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start `serve` on a free port (`wrapper`: a command prefix it runs under); returns it and its URL."""
    command = [sys.executable, "-m", "service", "serve", "--model", str(model_dir), "--store", str(store),
               "--port", "0"]
    proc = subprocess.Popen([*wrapper, *command], cwd=repo, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := READY.search(line):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, match.group(1)
    raise RuntimeError("the server exited before it was ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--repo", type=Path, default=BENCH_DIR.parent, help="checkout whose server runs")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(args.cache_dir)
    adapter = ensure_big_adapter(args.cache_dir, model_dir)
    size = sum(f.stat().st_size for f in adapter.iterdir()) / 2**20
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.repo.resolve(), model_dir, Path(tmp) / "store", env)
        try:
            rows = [("start", vm_rss_mib(proc.pid))]
            with httpx.Client(base_url=url, timeout=300) as client:
                for cycle in range(1, args.cycles + 1):
                    files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir())
                             if f.name.startswith("adapter_")]
                    r = client.post("/adapters", files=files, data={"adapter_id": "big"})
                    r.raise_for_status()
                    client.post("/generate", json={"prompt": "hello", "max_new_tokens": 4,
                                                   "adapter_id": "big"}).raise_for_status()
                    loaded = vm_rss_mib(proc.pid)
                    client.delete("/adapters/big").raise_for_status()
                    rows.append((str(cycle), loaded, vm_rss_mib(proc.pid)))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"adapter files: {size:.1f} MiB; server env: {env or 'default'}; repo: {args.repo}")  # noqa: T201
    print("| cycle | VmRSS loaded (MiB) | VmRSS after delete (MiB) |\n|---|---|---|")  # noqa: T201
    print(f"| start | | {rows[0][1]:.0f} |")  # noqa: T201
    for cycle, loaded, after in rows[1:]:
        print(f"| {cycle} | {loaded:.0f} | {after:.0f} |")  # noqa: T201


if __name__ == "__main__":
    main()
