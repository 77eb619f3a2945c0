"""The connector's CLI under tracemalloc, for finding where its memory goes in a soak.

    python bench/soak/tracedconnector.py connector --config connector.json

SIGUSR1 writes, under ``$WC_SNAPSHOT_PREFIX.N`` (N counts from 0), a tracemalloc snapshot
(an empty file with ``WC_TRACE_FRAMES=0``) and ``.N.json`` with what tracemalloc does not see:
the gc-tracked objects by type and glibc's heap figures (``mallinfo2``: bytes in use, free
inside the heap, mmapped), which tell Python objects kept from a heap that grew and cannot
shrink. ``soak.py --tracemalloc`` sends it after
the warm-up and at the end and prints the difference. Tracing slows the connector and adds
its own memory: use the RSS figures of an untraced run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FRAMES = int(os.environ.get("WC_TRACE_FRAMES", "8"))  # 0: no tracing, the other figures only
if FRAMES:
    tracemalloc.start(FRAMES)
_numbers = itertools.count()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap() -> dict[str, int]:
    """glibc's figures for the main arena plus mmapped blocks ({} on another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {
        "heap": info.arena,
        "in_use": info.uordblks,
        "free": info.fordblks,
        "mmapped": info.hblkhd,
        "releasable": info.keepcost,
    }


def _dump(signum: int, frame: FrameType | None) -> None:
    path = f"{os.environ['WC_SNAPSHOT_PREFIX']}.{next(_numbers)}"
    types = Counter(type(each).__name__ for each in gc.get_objects())
    extra = {
        "objects": dict(types.most_common(40)),
        "gc_counts": gc.get_count(),
        "heap": _heap(),
        "traced": tracemalloc.get_traced_memory(),
        "pymalloc_blocks": sys.getallocatedblocks(),
    }
    Path(path + ".json").write_text(json.dumps(extra))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(path + ".tmp")
    else:
        Path(path + ".tmp").write_bytes(b"")
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR1, _dump)

from webhook_connect.cli import main  # noqa: E402

main()
