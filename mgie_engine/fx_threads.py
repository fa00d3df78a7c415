"""Keep torch.fx tracing in one thread from breaking eager modules in the others.

``torch.fx.Tracer.trace`` patches ``nn.Module.__call__`` and ``nn.Module.__getattr__`` on the class, for every
thread, while it traces. A compile traces that way: AOTAutograd's ``make_fx`` for each graph it compiles, and
inductor, the first time it lowers in a process, a placeholder for its loop bodies (``symbolic_trace``). A module
called eagerly by another thread meanwhile goes through that tracer: the placeholder's fails ("NameError: module
is not installed as a submodule"), ``make_fx``'s patches the caller's globals from the wrong thread. That is the
worker's case while it compiles in a thread and serves eagerly in another: an H200 first start lost an edit to
it (bench/NOTES.md, "Start-up and load").

``install()`` makes those two patches per thread: the thread that traces sees the tracer's functions, every
other thread the ones it saw before the patch. Tracing itself is unchanged.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_PATCHED = ("__call__", "__getattr__")
_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Make torch.fx's class-wide module patches apply only to the tracing thread (idempotent). False where
    this torch has no ``_Patcher.patch_method`` to wrap (then nothing changes, and the log says so)."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch.fx._symbolic_trace import _Patcher
        except ImportError:
            _Patcher = None
        original = getattr(_Patcher, "patch_method", None)
        if original is None:
            log.warning("torch.fx has no _Patcher.patch_method: an eager module running beside a compile may "
                        "fail while inductor traces")
            return False

        @functools.wraps(original)
        def patch_method(self: Any, cls: type, name: str, new_fn: Callable, *args: Any, **kwargs: Any) -> Any:
            if cls is torch.nn.Module and name in _PATCHED:
                new_fn = _for_this_thread(new_fn, getattr(cls, name))
            return original(self, cls, name, new_fn, *args, **kwargs)

        _Patcher.patch_method = patch_method
        _installed = True
        return True


def _for_this_thread(patched: Callable, before: Callable) -> Callable:
    """``patched`` in the thread that is patching now, ``before`` in every other thread."""
    owner = threading.get_ident()

    @functools.wraps(patched)
    def per_thread(*args: Any, **kwargs: Any) -> Any:
        return (patched if threading.get_ident() == owner else before)(*args, **kwargs)

    return per_thread
