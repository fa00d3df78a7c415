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
