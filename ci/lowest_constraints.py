"""Print pip constraints pinning each direct dependency of pyproject.toml to its lowest declared version.

`make test-min-deps` installs the project with these constraints (`pip install -c`), so the runtime and engine
tests run against the minimums that pyproject.toml declares: a bound that is too low fails there, not on a user's
machine. Only `>=` lower bounds are pinned; torch is left to TORCH_SPEC (the CPU wheel is installed first).

    python ci/lowest_constraints.py [pyproject.toml] > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no TOML reader: the dependency list is simple enough to read
    tomllib = None  # type: ignore[assignment]

SKIP = {"torch"}  # installed first from TORCH_SPEC
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def lowest_constraints(pyproject: Path) -> list[str]:
    """`name==version` for every direct dependency with a `>=version` bound (in declaration order)."""
    dependencies = _dependencies(pyproject.read_text())
    lines = []
    for requirement in dependencies:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"cannot parse the requirement {requirement!r}")
        name, specifiers = match.group(1), match.group(3)
        lowest = re.search(r">=\s*([^,\s]+)", specifiers)
        if lowest is None:
            raise ValueError(f"{name} declares no lower bound (>=): every direct dependency needs one")
        if name.lower() not in SKIP:
            lines.append(f"{name}=={lowest.group(1)}")
    return lines


def _dependencies(text: str) -> list[str]:
    """[project] dependencies: with tomllib, or the quoted strings of the `dependencies = [...]` block."""
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["dependencies"])
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    if block is None:
        raise ValueError("no `dependencies = [...]` in pyproject.toml")
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
    sys.stdout.write("".join(line + "\n" for line in lowest_constraints(path)))
