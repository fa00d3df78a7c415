"""A compiling worker serves eagerly while it compiles, and compiled after; a failed compile leaves it
serving eagerly and says so; compiles during service are counted.

On a CPU nothing compiles, so these tests make pipelines report what they were asked for, as on a GPU
(``compiles``), and put a slow or failing warm-up in place of the compile (``MgiePipeline.warm_up``).
Which pipeline ran each denoising step is recorded by the pipeline's ``compile_unet``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_worker import _job

from mgie_engine.pipeline import MgiePipeline
from mgie_engine.protocol import WorkerState
from mgie_engine.settings import EngineSettings
from mgie_engine.worker import LocalWorker

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
             "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """Pipelines compile when asked to, as on CUDA; the compile cache's environment is restored after."""
    monkeypatch.setattr(MgiePipeline, "compiles", property(lambda self: self.compile_unet))
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def steps_by_mode(monkeypatch) -> list[str]:
    """"eager" or "compiled" per denoising step call, in order."""
    seen: list[str] = []
    original = MgiePipeline.denoise_step

    def recording(self, states):
        seen.append("compiled" if self.compile_unet else "eager")
        return original(self, states)

    monkeypatch.setattr(MgiePipeline, "denoise_step", recording)
    return seen


def _slow_compile(monkeypatch) -> threading.Event:
    """The compile's warm-up waits until the returned event is set (a compile of minutes, on a CPU)."""
    release = threading.Event()

    def warm_up(self, max_jobs):
        assert release.wait(60), "the test never released the compile"

    monkeypatch.setattr(MgiePipeline, "warm_up", warm_up)
    return release


async def one_slow_edit_as_the_worker_turns_ready(worker: LocalWorker, monkeypatch, steps: int) -> None:
    """Start ``worker``, send one edit of ``steps`` steps of 0.3 s each as soon as it is ready, wait until it
    serves compiled, and shut it down."""
    stepped = MgiePipeline.denoise_step

    def slow_step(self, states):
        threading.Event().wait(0.3)
        return stepped(self, states)

    monkeypatch.setattr(MgiePipeline, "denoise_step", slow_step)
    worker.start()
    try:
        await worker.wait_ready()
        outcome = await worker.run(_job("a" * 32, 1, steps=steps))
        assert await worker.wait_compiled() == "compiled"
    finally:
        worker.shutdown()
    assert outcome.png.startswith(b"\x89PNG")


def _worker(tiny_models, tmp_path, **kw) -> LocalWorker:
    settings = EngineSettings(device="cpu", max_side=64, compile=True, data_dir=str(tmp_path))
    return LocalWorker(settings, loader=lambda _s: tiny_models, **kw)


async def test_a_worker_serves_eagerly_while_it_compiles_and_compiled_after(tiny_models, tmp_path, monkeypatch,
                                                                          as_on_a_gpu, steps_by_mode):
    release = _slow_compile(monkeypatch)
    worker = _worker(tiny_models, tmp_path)
    worker.start()
    try:
        assert await worker.wait_ready() is WorkerState.READY  # ready with the weights, not after the compile
        assert worker.info()["mode"] == "eager (compiling)"
        during = await worker.run(_job("a" * 32, 1, steps=3))
        assert steps_by_mode == ["eager"] * 3
        assert worker.info()["mode"] == "eager (compiling)"  # the edit did not wait for the compile
        release.set()
        assert await worker.wait_compiled() == "compiled"
        after = await worker.run(_job("b" * 32, 2, steps=3))
        info = worker.info()
    finally:
        release.set()
        worker.shutdown()
    assert during.png.startswith(b"\x89PNG") and after.png.startswith(b"\x89PNG")
    assert steps_by_mode == ["eager"] * 3 + ["compiled"] * 3
    assert info["mode"] == "compiled" and info["compiles"] == 0
    assert worker.pipeline.compile_unet


async def test_an_eager_edit_beside_a_compile_that_traces_is_not_broken_by_the_tracer(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu):
    """A compile traces with ``torch.fx`` (inductor's loop-body placeholder, AOTAutograd's graphs), and each
    trace patches ``nn.Module.__call__`` for every thread. An H200 first start lost an edit to it ("module is
    not installed as a submodule"): the eager UNet ran through the compile thread's tracer. Here the compile
    traces as inductor's placeholder does, without a pause, for the whole edit."""
    release, traces = threading.Event(), []

    def tracing_warm_up(self, max_jobs):
        while not release.is_set():
            traces.append(torch.fx.symbolic_trace(lambda x: x + 1))

    monkeypatch.setattr(MgiePipeline, "warm_up", tracing_warm_up)
    worker = _worker(tiny_models, tmp_path)
    worker.start()
    try:
        await worker.wait_ready()
        first = len(traces)
        outcome = await worker.run(_job("a" * 32, 1, steps=3))
        during = len(traces) - first
        release.set()
        assert await worker.wait_compiled() == "compiled"
    finally:
        release.set()
        worker.shutdown()
    assert outcome.png.startswith(b"\x89PNG")
    assert during > 10  # the edit ran while the compile thread traced
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert [n.op for n in torch.fx.symbolic_trace(module).graph.nodes] == ["placeholder", "call_module", "output"]


async def test_a_running_job_takes_its_next_step_compiled_once_the_compile_is_ready(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu):
    """The switch is at a step boundary: a job half-way through moves over, and (same math on a CPU)
    its result is the one it would have had on either pipeline alone."""
    release = _slow_compile(monkeypatch)
    worker = _worker(tiny_models, tmp_path)
    seen: list[str] = []
    original = MgiePipeline.denoise_step

    def recording(self, states):
        seen.append("compiled" if self.compile_unet else "eager")
        if len(seen) == 2:  # the compile finishes while the job is between its 2nd and 3rd steps
            release.set()
            assert worker.modes.settled.wait(30)
        return original(self, states)

    monkeypatch.setattr(MgiePipeline, "denoise_step", recording)
    worker.start()
    try:
        await worker.wait_ready()
        mixed = await worker.run(_job("a" * 32, 7, steps=6))
        compiled_only = await worker.run(_job("b" * 32, 7, steps=6))
    finally:
        release.set()
        worker.shutdown()
    assert seen == ["eager"] * 2 + ["compiled"] * 4 + ["compiled"] * 6
    assert mixed.png == compiled_only.png


async def test_a_failed_compile_leaves_the_worker_serving_eagerly_and_says_so(tiny_models, tmp_path, monkeypatch,
                                                                             as_on_a_gpu, steps_by_mode, caplog):
    def broken(self, max_jobs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(MgiePipeline, "warm_up", broken)
    worker = _worker(tiny_models, tmp_path)
    worker.start()
    try:
        with caplog.at_level("INFO", logger="mgie_engine.serving_modes"):
            assert await worker.wait_ready() is WorkerState.READY
            assert await worker.wait_compiled() == "eager (compile failed)"
        outcome = await worker.run(_job("a" * 32, 1, steps=2))
        info = worker.info()
    finally:
        worker.shutdown()
    assert outcome.png.startswith(b"\x89PNG") and steps_by_mode == ["eager"] * 2
    assert worker.state is WorkerState.READY
    assert info["mode"] == "eager (compile failed)" and "inductor exploded" in info["compile_error"]
    assert any("compiling failed; running without compiled steps" in r.getMessage() for r in caplog.records)


async def test_without_a_compile_the_worker_says_eager(tiny_models, tmp_path):
    worker = LocalWorker(EngineSettings(device="cpu", max_side=64, data_dir=str(tmp_path)),
                         loader=lambda _s: tiny_models)
    worker.start()
    try:
        await worker.wait_ready()
        assert await worker.wait_compiled() == "eager"
        info = worker.info()
    finally:
        worker.shutdown()
    assert info["mode"] == "eager" and "compile_error" not in info
    assert not (tmp_path / "compile-cache").exists()  # a worker that does not compile keeps no cache


async def test_compiles_during_service_are_counted_and_the_warm_ups_are_not(tiny_models, tmp_path, monkeypatch,
                                                                            as_on_a_gpu):
    """Dynamo compiles in the serving thread (a shape the warm-up missed) show in the worker's info; those
    of the compile thread do not."""
    plus_one = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)

    def warm_up(self, max_jobs):
        plus_one(torch.ones(1))  # a compile in the compile thread

    original = MgiePipeline.denoise_step

    def step(self, states):
        if self.compile_unet:
            plus_one(torch.ones(len(states) + 1 + self.denoiser.models.vae_scale_factor))  # a new shape
        return original(self, states)

    monkeypatch.setattr(MgiePipeline, "warm_up", warm_up)
    monkeypatch.setattr(MgiePipeline, "denoise_step", step)
    worker = _worker(tiny_models, tmp_path)
    worker.start()
    try:
        await worker.wait_ready()
        assert await worker.wait_compiled() == "compiled"
        before = worker.info()["compiles"]
        await worker.run(_job("a" * 32, 1, steps=2))
        after = worker.info()["compiles"]
    finally:
        worker.shutdown()
    assert before == 0 and after >= 1


def test_the_redis_heartbeat_carries_the_mode_and_the_compiles_in_service(tiny_models, tmp_path):
    from mgie_engine.redis_pool import payloads
    from mgie_engine.redis_pool.service import _mode_fields

    worker = _worker(tiny_models, tmp_path)
    assert _mode_fields(worker) == {}  # still loading: no mode yet
    worker.pipeline = object()  # loaded
    worker.modes.compiling()
    beat = payloads.decode_heartbeat(payloads.encode_heartbeat(name="h:1:cuda:0", state="ready", capacity=8,
                                                               active=0, **_mode_fields(worker)))
    assert (beat["mode"], beat["compiles"]) == ("eager (compiling)", 0)
    older = payloads.decode_heartbeat(payloads.encode_heartbeat(name="h:1:cuda:0", state="ready", capacity=8,
                                                                active=0))
    assert (older["mode"], older["compiles"]) == (None, 0)  # a worker from before modes
    with pytest.raises(payloads.BadPayloadError):
        payloads.decode_heartbeat(payloads.encode_heartbeat(name="w", state="ready", capacity=1, active=0,
                                                            mode="x" * 41))


async def test_a_shutdown_stops_the_compile_between_warm_up_batches(tiny_models, tmp_path, monkeypatch, as_on_a_gpu):
    """A worker shut down while it compiles does not compile on for minutes: its warm-up stops after the
    batch it is in, and ``join`` sees both threads end."""
    worker = _worker(tiny_models, tmp_path)
    batches = []
    original = MgiePipeline.guidance

    def guidance(self, prompts, cancel=None, use_cache=True):
        if not use_cache:  # a warm-up batch
            batches.append(len(prompts))
            worker.shutdown()
        return original(self, prompts, cancel, use_cache)

    monkeypatch.setattr(MgiePipeline, "guidance", guidance)
    worker.start()
    await worker.wait_ready()
    assert await worker.wait_compiled() == "eager"
    assert worker.join(30)
    assert batches == [1]  # of the 7


@pytest.mark.parametrize(("give_way", "waits"), [(30.0, True), (0.0, False)])
async def test_an_edit_sent_as_the_worker_turns_ready_runs_before_the_first_warm_up_batch(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu, steps_by_mode, give_way, waits):
    """MGIE_COMPILE_GIVE_WAY: the edit the queue hands over as the worker turns ready (one queued during a
    restart) finishes at eager speed before the in-process compile's first batch, instead of beside it; the
    compile gives it a moment to arrive (``ARRIVALS_SECONDS``). 0 turns that off."""
    at_batches: list[int] = []  # eager steps run when each warm-up batch started

    def warm_up(self, max_jobs):  # at once, as the worker turns ready
        for _ in range(2):
            if self.before_warm_up_batch is not None:
                self.before_warm_up_batch()
            at_batches.append(len(steps_by_mode))

    monkeypatch.setattr(MgiePipeline, "warm_up", warm_up)
    settings = EngineSettings(device="cpu", max_side=64, compile=True, data_dir=str(tmp_path),
                              compile_give_way=give_way)
    await one_slow_edit_as_the_worker_turns_ready(LocalWorker(settings, loader=lambda _s: tiny_models), monkeypatch,
                                                  steps=4)
    # with the give-way the first batch began after the edit's last (eager) step; without, beside it
    assert (at_batches[0] == 4) is waits
    if waits:
        assert steps_by_mode == ["eager"] * 4


def test_giving_way_is_bounded_and_ends_when_the_loop_is_idle_or_the_worker_stops():
    from mgie_engine.serving_modes import ServingModes

    modes = ServingModes()
    modes.loop_idle(True)
    assert modes.give_way(5.0) < 0.1  # nothing to wait for
    modes.loop_idle(False)  # an edit runs, and runs on
    assert 0.2 <= modes.give_way(0.25) < 1.0
    threading.Timer(0.2, modes.loop_idle, (True,)).start()  # the edit ends
    assert 0.15 <= modes.give_way(5.0) < 2.0
    assert 0.25 <= modes.give_way(5.0, arrivals=0.3) < 1.0  # waited for edits that did not come
    threading.Timer(0.1, modes.loop_idle, (False,)).start()  # one comes, and ends at 0.4 s
    threading.Timer(0.4, modes.loop_idle, (True,)).start()
    assert 0.35 <= modes.give_way(5.0, arrivals=0.3) < 2.0
    modes.loop_idle(False)
    modes.stop.set()
    assert modes.give_way(5.0) < 0.1


def test_the_warm_up_calls_its_hook_before_each_batch_and_may_stop_there(tiny_models):
    from mgie_engine.warm_up import WarmUpStopped

    pipe = MgiePipeline(tiny_models, max_side=64)
    pipe.stop_warm_up, calls = threading.Event(), []
    pipe.before_warm_up_batch = lambda: (calls.append(1), pipe.stop_warm_up.set())
    with pytest.raises(WarmUpStopped, match="before warm-up batch 1/"):
        pipe.warm_up(max_jobs=1)
    assert calls == [1]


def test_cuda_graph_recordings_are_counted_apart_from_compiles():
    """Inductor's cudagraph trees announce each recording through dynamo's compile callbacks: an H200 load test
    counted 15 "compiles" in service that were recordings of new shapes (dynamo compiled no frame)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from mgie_engine.serving_modes import compiles_in, count_compiles, recordings_in

    assert count_compiles()
    seen = {}

    def announce() -> None:
        me = threading.get_ident()
        before = compiles_in(me), recordings_in(me)  # thread ids are reused: an earlier thread's counts stay
        with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "0/0"):
            pass
        with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "0/1"):
            pass
        with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "1/0"):
            pass
        seen.update(compiles=compiles_in(me) - before[0], recordings=recordings_in(me) - before[1])

    thread = threading.Thread(target=announce)
    thread.start()
    thread.join()
    assert seen == {"compiles": 1, "recordings": 2}


async def test_with_saved_steps_the_compile_thread_stays_after_the_compile_and_shutdown_does_not_wait_for_it(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu):
    """MGIE_COMPILE_AOT: the thread that loaded the saved steps never ends (its end is suspected in the H200's
    crashes, bench/NOTES.md "Stop 28"), and a worker still shuts down at once."""
    release = _slow_compile(monkeypatch)
    settings = EngineSettings(device="cpu", max_side=64, compile=True, compile_aot=True, data_dir=str(tmp_path))
    worker = LocalWorker(settings, loader=lambda _s: tiny_models)
    worker.start()
    try:
        await worker.wait_ready()
        compile_thread = worker.modes.thread
        release.set()
        assert await worker.wait_compiled() == "compiled"
        outcome = await worker.run(_job("a" * 32, 1, steps=2))
        for _ in range(100):
            if worker.modes.thread is None:
                break
            threading.Event().wait(0.05)
    finally:
        release.set()
        worker.shutdown()
    assert outcome.png.startswith(b"\x89PNG")
    assert worker.modes.thread is None and compile_thread.is_alive() and compile_thread.daemon
    assert worker.join(5)
    assert compile_thread.is_alive()
