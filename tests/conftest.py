"""Shared set-up: offline Hugging Face, bounded threads, tests/oracle.py importable everywhere, and how
`make test` shares the modules out between its pytest-xdist workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py is shared by every test package

# Folders whose modules go to one worker, one after another: the Ray suite (each module starts a local Ray
# cluster; two at once would fight over the cores and Ray's session directory) and the plug-in suite (one pip
# build of examples/molora instead of one per worker).
ONE_WORKER_FOLDERS = ("tests/distributed/", "tests/plugins/")
# Modules that start server processes or a Ray cluster take the longest: handed out first, so that the quick
# in-process modules fill the end of the run instead of one worker finishing a long module alone.
SLOW_FIRST = ("tests/distributed/", "tests/api/")

try:
    from xdist.remote import Producer
    from xdist.scheduler import LoadFileScheduling
    from xdist.workermanage import WorkerController
except ImportError:  # pytest-xdist is in the dev extra; without it the suite runs in one process
    LoadFileScheduling = None


if LoadFileScheduling is not None:

    class ModuleScheduling(LoadFileScheduling):
        """`--dist loadfile` (a module runs whole on one worker, in file order as in a serial run, and its
        module-scoped fixtures start once), with each folder of ONE_WORKER_FOLDERS one unit of work and the
        units of SLOW_FIRST handed out before the others.

        Scopes are taken from node ids here: xdist's own `--dist loadgroup` loses its groups on pytest 9.2
        (pytest-xdist issue #1386) and would quietly run the Ray modules side by side."""

        def _split_scope(self, nodeid: str) -> str:
            return next((folder for folder in ONE_WORKER_FOLDERS if nodeid.startswith(folder)),
                        super()._split_scope(nodeid))

        def _assign_work_unit(self, node: WorkerController) -> None:
            # The queue holds the modules by test count, most first; the first slow one moves to its head.
            slow = next((scope for scope in self.workqueue if scope.startswith(SLOW_FIRST)), None)
            if slow is not None:
                self.workqueue.move_to_end(slow, last=False)
            super()._assign_work_unit(node)

    @pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own choice of scheduler
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadFileScheduling | None:
        return ModuleScheduling(config, log) if config.getvalue("dist") == "loadfile" else None
