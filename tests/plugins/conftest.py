"""Install the example MoLoRA plug-in (examples/molora) the way a user would: pip, then entry points.

It goes into a fresh target directory (never the shared venv), so the rest of the suite sees only the
built-in types; in-process tests put that directory on sys.path, server processes get it on PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from api.conftest import base_model, model_dir, server, shared_server, tokenizer  # noqa: F401  (shared fixtures)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "molora"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A directory holding the installed plug-in package and its dist-info (entry points)."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, root / "src")  # building writes into the source tree; keep the repo clean
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        check=True,
    )
    return site


@pytest.fixture()
def plugin_installed(plugin_site: Path) -> Iterator[Path]:
    """The plug-in importable and discoverable in this process, for the duration of one test."""
    sys.path.insert(0, str(plugin_site))
    try:
        yield plugin_site
    finally:
        sys.path.remove(str(plugin_site))
        for name in [m for m in sys.modules if m == "molora_adapter" or m.startswith("molora_adapter.")]:
            del sys.modules[name]


def plugin_env(site: Path) -> dict[str, str]:
    """Environment for a server process that has the plug-in installed."""
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths)}
