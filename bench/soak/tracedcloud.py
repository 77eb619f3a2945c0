"""The cloud's CLI under tracemalloc, for finding where per-connection memory goes.

    python bench/soak/tracedcloud.py cloud [options]

SIGUSR1 writes a snapshot to ``$WC_SNAPSHOT_PREFIX.N`` (N counts from 0); ``idle.py
--tracemalloc`` sends it before and after connecting and prints the difference. Tracing
slows the cloud and adds its own memory: use the RSS figures of an untraced run.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

tracemalloc.start(int(os.environ.get("WC_TRACE_FRAMES", "1")))
_numbers = itertools.count()


def _dump(signum: int, frame: FrameType | None) -> None:
    path = f"{os.environ['WC_SNAPSHOT_PREFIX']}.{next(_numbers)}"
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR1, _dump)

from webhook_connect.cli import main  # noqa: E402

main()
