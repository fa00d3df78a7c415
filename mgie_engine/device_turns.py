"""Taking turns on one GPU while a worker compiles in the background (serving_modes.py).

Two threads use a device during a background compile: the batch loop serving edits eagerly, and the
compile thread. Their ordinary GPU work may overlap (two streams of kernels). CUDA-graph capture may not:
a device synchronize, a ``cudaFree`` or an allocator pool switch in one thread invalidates a capture in
another. So while a device has a background compile:

- the compile thread records CUDA graphs (inductor's cudagraph trees, ``graphs.GraphedCall``, the
  decoder's graphs) only inside ``capturing(device)``, a turn it takes around each recording and
  around inductor's later warm-up runs (short: a graph's kernels run once);
- it never holds the turn around anything that can compile: each graph's function has run once outside
  the turn before its recording (``GraphedCall`` and the decoder run it on a side stream; inductor's
  first warm-up run of a function, which builds its triton kernels on first launch and autotunes them,
  runs outside it too), so the serving loop waits at most for one recording, never for a compile;
- the serving loop holds the same turn around each of its loop's GPU work (``serving``), so a recording
  never overlaps its kernels or frees;
- the serving thread records no CUDA graph itself (``may_record`` is False for it), since the compile
  thread's own synchronizes (autotuning, inductor's warm-up runs) are outside any turn.

The turn is a FIFO ticket lock: the serving loop, which takes it again right after giving it back,
cannot starve a recording that waits. Without a background compile every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class DeviceTurn:
    """A re-entrant FIFO lock: whoever asked first goes first."""

    def __init__(self) -> None:
        self.compile_thread: int | None = None  # the thread that compiles (and alone records graphs)
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._next = self._serving = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                ticket, self._next = self._next, self._next + 1
                while self._serving != ticket or self._owner is not None:
                    self._cond.wait()
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._serving += 1
                    self._cond.notify_all()


_turns: dict[str, DeviceTurn] = {}
_turns_lock = threading.Lock()


def _key(device: Any) -> str:
    """One name per physical device: 'cuda' and 'cuda:0' alike when 0 is the current one."""
    import torch

    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def begin_background_compile(device: Any) -> DeviceTurn:
    """Mark ``device`` as compiling in the background (the compile thread sets ``compile_thread``). A
    worker that replaces a stalled one takes the device over, even from a compile still running there."""
    key = _key(device)
    if key.startswith("cuda"):
        install_inductor_turns()
    with _turns_lock:
        if key in _turns:
            log.warning("%s: another worker's background compile is still running; this one takes over", key)
        _turns[key] = turn = DeviceTurn()
    return turn


def end_background_compile(device: Any, turn: DeviceTurn) -> None:
    """``turn``'s compile is over: every thread may record again, and nobody takes turns."""
    key = _key(device)
    with _turns_lock:
        if _turns.get(key) is turn:
            del _turns[key]


def _turn(device: Any) -> DeviceTurn | None:
    if not _turns:  # the common case, after every warm-up: no lookup at all
        return None
    return _turns.get(_key(device))


def serving(device: Any) -> contextlib.AbstractContextManager:
    """The serving loop's turn around one loop's GPU work (a no-op unless ``device`` compiles)."""
    turn = _turn(device)
    return turn.held() if turn is not None else contextlib.nullcontext()


def capturing(device: Any) -> contextlib.AbstractContextManager:
    """A CUDA-graph recording's turn (a no-op unless ``device`` compiles)."""
    return serving(device)


def may_record(device: Any) -> bool:
    """Whether this thread may record a CUDA graph on ``device`` now: always, except in the serving thread
    while the device compiles in the background (it runs the call without a graph instead)."""
    turn = _turn(device)
    return turn is None or turn.compile_thread == threading.get_ident()


def _in_turn(method: Callable, device_of: Callable[..., Any]) -> Callable:
    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with capturing(device_of(*args, **kwargs)):
            return method(*args, **kwargs)

    wrapped._mgie_turns = True  # type: ignore[attr-defined]
    return wrapped


def _warm_in_turn(method: Callable) -> Callable:
    """``run_eager(self, new_inputs, function_id)`` in the turn only once the function has run before: its
    first run may build triton kernels (they compile at first launch) and autotune them, which takes
    seconds to minutes, and is no recording (other threads' work may overlap it)."""
    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        function_id = args[1] if len(args) > 1 else kwargs.get("function_id")
        if function_id not in getattr(self, "warmed_up_functions", ()):
            return method(self, *args, **kwargs)
        with capturing(self.device_index):
            return method(self, *args, **kwargs)

    wrapped._mgie_turns = True  # type: ignore[attr-defined]
    return wrapped


def take_turns_in(manager: type) -> list[str]:
    """Wrap a cudagraph-tree manager class (inductor's ``CUDAGraphTreeManager``) so its recordings and
    its later warm-up runs take the device's turn; returns the names wrapped."""
    wrapped = []
    for name, wrap in (("record_function", lambda m: _in_turn(m, lambda self, *a, **k: self.device_index)),
                       ("run_eager", _warm_in_turn)):
        method = getattr(manager, name, None)
        if method is not None and not getattr(method, "_mgie_turns", False):
            setattr(manager, name, wrap(method))
            wrapped.append(name)
    init = manager.__init__
    if not getattr(init, "_mgie_turns", False):  # it records an empty graph to set up its memory pool
        manager.__init__ = _in_turn(init, lambda self, device_index, *a, **k: device_index)
        wrapped.append("__init__")
    return wrapped


@functools.cache
def install_inductor_turns() -> bool:
    """Make inductor's cudagraph trees take the device's turn around their recordings and later warm-up
    runs (``take_turns_in``; private torch API: when it is missing, say so and go on; recordings then only rely on their
    thread-local capture mode)."""
    try:
        from torch._inductor import cudagraph_trees as trees

        wrapped = take_turns_in(trees.CUDAGraphTreeManager)
    except Exception:
        log.warning("could not make inductor's CUDA-graph recordings take turns with the serving loop",
                    exc_info=True)
        return False
    log.debug("inductor's cudagraph trees take turns: %s", ", ".join(wrapped))
    return True


def cudagraph_state() -> tuple[Any, Any] | None:
    """This thread's cudagraph-tree state (inductor keeps the recorded graphs per thread), to hand to the
    compile thread so the graphs it records are the ones the serving thread replays afterwards."""
    try:
        from torch._inductor import cudagraph_trees as trees

        get = getattr(trees, "get_obj", None)
        if get is not None:
            return get(trees.local, "tree_manager_containers"), get(trees.local, "tree_manager_locks")
        return trees.local.tree_manager_containers, trees.local.tree_manager_locks
    except Exception:
        log.warning("cannot share the cudagraph trees with the compile thread; the serving thread will "
                    "record its graphs again at first use", exc_info=True)
        return None


def adopt_cudagraph_state(state: tuple[Any, Any] | None) -> None:
    """Use the serving thread's cudagraph-tree state in this (compile) thread."""
    if state is None:
        return
    from torch._inductor import cudagraph_trees as trees

    trees.local.tree_manager_containers, trees.local.tree_manager_locks = state
