"""While a device compiles in the background, CUDA-graph recordings take turns with the serving loop, and
only the compile thread records (the logic is plain Python; the recordings themselves need CUDA)."""

from __future__ import annotations

import threading
import time

from mgie_engine import device_turns
from mgie_engine.device_turns import DeviceTurn


def test_a_recording_waiting_for_its_turn_gets_it_between_two_serving_loops():
    """The serving loop takes the turn again right after giving it back; a waiting recording still goes next."""
    turn, loops, stop = DeviceTurn(), [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with turn.held():
                loops.append(time.monotonic())
                time.sleep(0.002)  # GPU work, GIL released, turn held

    server = threading.Thread(target=serve)
    server.start()
    try:
        while len(loops) < 5:
            time.sleep(0.001)
        asked = time.monotonic()
        with turn.held(), turn.held():  # re-entrant for its holder
            waited = time.monotonic() - asked
            seen = len(loops)
            time.sleep(0.02)
            assert len(loops) == seen  # the loop does not run while the recording holds the turn
    finally:
        stop.set()
        server.join(5)
    assert waited < 0.5 and len(loops) > seen  # one loop at most, then the loop goes on after


def test_only_the_compile_thread_records_while_a_device_compiles():
    assert device_turns.may_record("cpu")
    turn = device_turns.begin_background_compile("cpu")
    try:
        recorder: list[bool] = []

        def compile_thread() -> None:
            turn.compile_thread = threading.get_ident()
            recorder.append(device_turns.may_record("cpu"))

        thread = threading.Thread(target=compile_thread)
        thread.start()
        thread.join(5)
        assert recorder == [True]
        assert not device_turns.may_record("cpu")  # the serving thread runs its calls without a graph
        with device_turns.serving("cpu"):
            assert turn._owner == threading.get_ident()
        stale = device_turns.begin_background_compile("cpu")  # a replacing worker takes the device over
        device_turns.end_background_compile("cpu", turn)  # the first compile ending does not end the second
        assert not device_turns.may_record("cpu")
        turn = stale
    finally:
        device_turns.end_background_compile("cpu", turn)
    assert device_turns.may_record("cpu")
    assert device_turns.serving("cpu").__class__.__name__ == "nullcontext"  # no turns without a compile


class _Trees:
    """Inductor's cudagraph-tree manager as far as the turns see it: a function's first warm-up run builds
    and autotunes its triton kernels (slow: ``COMPILE`` seconds), later ones run them; a recording takes
    ``RECORD`` seconds."""

    COMPILE, RECORD = 1.2, 0.05

    def __init__(self, device_index: str) -> None:
        self.device_index = device_index
        self.warmed_up_functions: set[int] = set()
        self.events: list[str] = []

    def run_eager(self, new_inputs, function_id):
        if function_id not in self.warmed_up_functions:
            time.sleep(self.COMPILE)
        self.warmed_up_functions.add(function_id)
        self.events.append(f"warm {function_id}")

    def record_function(self, new_inputs, function_id):
        time.sleep(self.RECORD)
        self.events.append(f"recorded {function_id}")


def test_a_serving_step_never_waits_for_a_compile_only_for_a_recording():
    """Inductor's first warm-up run of a function can compile (triton kernels at first launch, autotuning):
    it runs outside the turn, so the serving loop goes on meanwhile; a recording, and a warm-up run of
    kernels already built, hold it."""
    trees_class = type("Trees", (_Trees,), {})
    assert device_turns.take_turns_in(trees_class) == ["record_function", "run_eager", "__init__"]
    assert device_turns.take_turns_in(trees_class) == []  # once
    turn = device_turns.begin_background_compile("cpu")
    trees = trees_class("cpu")
    waits: list[tuple[float, float]] = []  # (asked at, waited) per serving loop
    stop, compiled = threading.Event(), threading.Event()

    def compile_thread() -> None:
        turn.compile_thread = threading.get_ident()
        trees.run_eager([], 1)  # its first run: the slow compile
        compiled.set()
        trees.run_eager([], 1)  # in warm-up mode again: short, in the turn
        trees.record_function([], 1)

    def serve() -> None:
        while not stop.is_set():
            asked = time.monotonic()
            with device_turns.serving("cpu"):
                waits.append((asked, time.monotonic() - asked))
                time.sleep(0.002)

    server = threading.Thread(target=serve)
    server.start()
    try:
        time.sleep(0.05)
        started = time.monotonic()
        compiler = threading.Thread(target=compile_thread)
        compiler.start()
        compiler.join(10)
        ended = time.monotonic()
        time.sleep(0.05)
    finally:
        stop.set()
        server.join(5)
        device_turns.end_background_compile("cpu", turn)
    assert trees.events == ["warm 1", "warm 1", "recorded 1"]
    during = [w for at, w in waits if started <= at <= ended]
    assert len(during) > 50  # the loop went on during the compile
    assert max(w for _at, w in waits) < _Trees.COMPILE / 2  # ~ one recording, never the compile
