"""`adapter_client` stands alone: it imports no server code and no heavy library, and its CLI runs by itself."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from adapter_client.progress import ProgressLine, format_bytes

ROOT = Path(__file__).resolve().parents[2]
SERVER_MODULES = ("torch", "transformers", "fastapi", "starlette", "pydantic", "service", "tqdm")

IMPORT_EVERYTHING = """
import json, sys
import adapter_client, adapter_client.cli, adapter_client.client, adapter_client.progress
import adapter_client.types, adapter_client.upload
adapter_client.cli.add_client_commands(__import__("argparse").ArgumentParser().add_subparsers())
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_imports_neither_server_nor_heavy_libraries() -> None:
    result = run_python("-c", IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "httpx" in loaded
    assert loaded.isdisjoint(SERVER_MODULES), loaded & set(SERVER_MODULES)


def test_typed_marker_ships() -> None:
    assert (ROOT / "adapter_client" / "py.typed").is_file()


def test_cli_runs_alone() -> None:
    help_ = run_python("-m", "adapter_client", "adapters", "--help")
    assert help_.returncode == 0 and "upload" in help_.stdout and "activate" in help_.stdout
    missing = ROOT / "no-such-adapter"
    upload = run_python("-m", "adapter_client", "adapters", "upload", str(missing), "--url", "http://127.0.0.1:9")
    assert (upload.returncode, upload.stdout, upload.stderr) == (1, "", f"error: {missing} does not exist\n")


def test_progress_line_redraws_on_each_new_percent_and_ends_the_line() -> None:
    stream = io.StringIO()
    progress = ProgressLine("upload a", stream)
    for sent in (0, 1, 2, 512, 1024, 2048):  # 1 and 2 bytes of 2048 are both 0%
        progress(sent, 2048)
    progress.close()
    assert stream.getvalue() == ("\rupload a:   0% 0 B / 2.0 KiB\rupload a:  25% 512 B / 2.0 KiB"
                                 "\rupload a:  50% 1.0 KiB / 2.0 KiB\rupload a: 100% 2.0 KiB / 2.0 KiB\n")


def test_progress_line_prints_nothing_when_nothing_was_sent() -> None:
    stream = io.StringIO()
    ProgressLine("upload a", stream).close()
    assert stream.getvalue() == ""


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 1536, 2 * 1024**2, 3 * 1024**3)] == [
        "512 B", "1.5 KiB", "2.0 MiB", "3.0 GiB"]
