"""ci/lowest_constraints.py pins every direct dependency at its declared lower bound, and in `make test-min-deps`
those are the versions installed."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def constraints() -> dict[str, str]:
    out = subprocess.run([sys.executable, str(REPO / "ci" / "lowest_constraints.py")], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("==") for line in out.splitlines())


def test_every_direct_dependency_but_torch_is_pinned_at_its_lower_bound() -> None:
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
    declared = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)>=([^",;\s]+)', block, re.MULTILINE))
    assert set(declared) - set(constraints()) == {"torch"}
    assert {name: declared[name] for name in constraints()} == constraints()


def test_a_dependency_without_a_lower_bound_is_refused(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = [\n  "fastapi",\n]\n')
    script = str(REPO / "ci" / "lowest_constraints.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "pyproject.toml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "fastapi declares no lower bound" in proc.stderr


@pytest.mark.skipif(not sys.prefix.rstrip("/").endswith(".venv-min"), reason="only in make test-min-deps")
def test_the_min_deps_venv_holds_the_lowest_versions() -> None:
    for name, version in constraints().items():
        installed = importlib.metadata.version(name)
        release = [int(p) for p in re.findall(r"\d+", installed.split("+")[0])] + [0, 0]
        assert release[:3] == ([int(p) for p in version.split(".")] + [0, 0])[:3], (name, installed, version)
