"""Small CPU thread pools beside the GPU thread, each made on first use (importing the engine starts none).

Their work is numpy, zlib and PIL, which drop the GIL, so a few threads run it in parallel.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_lock = threading.Lock()


def cpu_pool(name: str, workers: int = 4) -> concurrent.futures.ThreadPoolExecutor:
    """The pool called ``name``, with up to ``workers`` threads (never more than the CPU has)."""
    with _lock:
        if name not in _pools:
            _pools[name] = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(workers, os.cpu_count() or 1), thread_name_prefix=f"mgie-{name}")
        return _pools[name]
