"""A worker whose card has room compiles in a child process while it serves eagerly, then compiles in-process
with the child's cache and switches; a child that fails, dies or overruns leaves the in-process compile to do
it all; the child never outlives the worker; the compile thread hands the GIL over sooner.

As in test_serving_modes.py, pipelines report what they were asked for (``compiles``) and the in-process
compile is a stand-in warm-up (nothing compiles on a CPU). Children are small Python scripts standing in for
``python -m mgie_engine.compile_child`` (which the last tests run for real).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import test_serving_modes
from conftest import tiny_settings
from test_worker import _job

from mgie_engine import compile_cache, compile_child, device_turns, serving_modes
from mgie_engine.compile_child import ChildLauncher, decide, how_many, room_needed, shares
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.protocol import WorkerState
from mgie_engine.serving_modes import ServingModes
from mgie_engine.settings import EngineSettings
from mgie_engine.warm_up import compile_groups, warm_up_batches
from mgie_engine.worker import LocalWorker

GiB = 2**30
as_on_a_gpu = test_serving_modes.as_on_a_gpu  # fixtures
steps_by_mode = test_serving_modes.steps_by_mode


def _script(body: str) -> tuple[str, ...]:
    """A child command: ``body`` run by this Python, with ``folder`` (the worker's compile cache folder)."""
    prelude = "import os, sys, time, json\nfrom pathlib import Path\nfolder = Path(os.environ['MGIE_COMPILE_CHILD_FOLDER'])\n"
    return (sys.executable, "-c", prelude + textwrap.dedent(body))


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def in_process_compiles(monkeypatch) -> list[dict]:
    """The in-process compile (warm-up) as a quick stand-in that notes what it saw."""
    seen: list[dict] = []

    def warm_up(self, max_jobs):
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent
        seen.append({"switch_interval": sys.getswitchinterval(), "thread": threading.current_thread().name,
                     "artifacts": sorted(f.name for f in folder.glob("artifacts*.bin"))})

    monkeypatch.setattr(MgiePipeline, "warm_up", warm_up)
    return seen


def _worker(tiny_models, tmp_path, command=None, timeout=60.0, **settings) -> LocalWorker:
    settings = EngineSettings(device="cpu", max_side=64, compile=True, data_dir=str(tmp_path),
                              **{"compile_child": True, **settings})
    launcher = ChildLauncher(command=command, timeout=timeout) if command else None
    return LocalWorker(settings, loader=lambda _s: tiny_models, compile_child=launcher)


async def _info_once_compiled(worker: LocalWorker) -> dict:
    """Start ``worker``, wait until it serves compiled, and return its info (the worker is shut down)."""
    worker.start()
    try:
        await worker.wait_ready()
        assert await worker.wait_compiled() == "compiled"
        return worker.info()
    finally:
        worker.shutdown()


async def test_the_worker_serves_eagerly_while_the_child_compiles_then_compiles_with_its_cache_and_switches(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu, steps_by_mode, in_process_compiles):
    release = tmp_path / "release"
    child = _script(f"""
        index = os.environ["MGIE_COMPILE_CHILD_INDEX"]
        (folder / f"child-env-{{index}}.json").write_text(json.dumps({{k: v for k, v in os.environ.items()
                                                           if k.startswith(("MGIE_COMPILE_CHILD_", "TORCHINDUCTOR_"))}}))
        while not Path({str(release)!r}).exists():
            time.sleep(0.02)
        (folder / f"artifacts-child-{{index}}.bin").write_bytes(b"the child's cache artifacts")
    """)
    loaded: list[Path] = []
    monkeypatch.setattr(compile_cache, "load_artifacts", lambda folder: loaded.append(folder) or True)
    may_record: list[bool] = []  # per eager step: whether the serving thread may record its CUDA graphs
    counted_step = MgiePipeline.denoise_step

    def step(self, states):
        may_record.append(device_turns.may_record(self.models.device))
        return counted_step(self, states)

    monkeypatch.setattr(MgiePipeline, "denoise_step", step)
    before = sys.getswitchinterval()
    worker = _worker(tiny_models, tmp_path, child, compile_switch_interval=0.0007)
    worker.start()
    try:
        assert await worker.wait_ready() is WorkerState.READY
        info = worker.info()
        assert (info["mode"], info["compile_phase"]) == ("eager (compiling)", "child")
        during = await worker.run(_job("a" * 32, 1, steps=3))
        assert steps_by_mode == ["eager"] * 3 and in_process_compiles == []  # nothing compiles here meanwhile
        assert may_record == [True] * 3  # no compile thread records here: eager keeps its own graphs
        assert sys.getswitchinterval() == before  # no compile thread to hand the GIL over to
        release.touch()
        assert await worker.wait_compiled() == "compiled"
        after = await worker.run(_job("b" * 32, 2, steps=3))
        info = worker.info()
    finally:
        release.touch()
        worker.shutdown()
    assert during.png.startswith(b"\x89PNG") and after.png.startswith(b"\x89PNG")
    assert steps_by_mode == ["eager"] * 3 + ["compiled"] * 3
    # in-process after every child had finished (their caches are in the shared folder), the GIL handed over
    # every 0.7 ms meanwhile
    groups = compile_groups(64, 8)
    [warm] = in_process_compiles
    assert warm["artifacts"] == [f"artifacts-child-{i}.bin" for i in range(len(groups))]
    assert warm["switch_interval"] == pytest.approx(0.0007) and warm["thread"].endswith("-compile")
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert loaded == [folder]  # at start (none yet); the children wrote straight into the folder
    assert sys.getswitchinterval() == before  # restored
    assert info["mode"] == "compiled" and "compile_phase" not in info
    assert info["compile_child"].startswith("done in") and f"({len(groups)} processes)" in info["compile_child"]
    # one child per warm-up group, side by side: the worker's settings and folder, its own share of the batches,
    # the host's cores shared out among their compile workers
    envs = [json.loads((folder / f"child-env-{i}.json").read_text()) for i in range(len(groups))]
    assert [tuple(int(k) for k in env["MGIE_COMPILE_CHILD_BATCHES"].split(",")) for env in envs] == groups
    threads = {int(env["TORCHINDUCTOR_COMPILE_THREADS"]) for env in envs}
    assert threads == {max(1, len(os.sched_getaffinity(0)) // len(groups))}
    for env in envs:
        assert env["MGIE_COMPILE_CHILD_FOLDER"] == str(folder) and env["MGIE_COMPILE_CHILD_CAPACITY"] == "8"
        assert EngineSettings(**json.loads(env["MGIE_COMPILE_CHILD_SETTINGS"])) == worker.settings
        assert env["MGIE_COMPILE_CHILD_PARENT"] == str(os.getpid())


@pytest.mark.parametrize(("body", "timeout", "said"), [
    ("sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory\\n'); sys.exit(3)", 60.0,
     ["failed: exit 3 after", "(torch.OutOfMemoryError: CUDA out of memory)"]),
    ("print('compiling', flush=True); os.kill(os.getpid(), 9)", 60.0, ["failed: killed by signal 9", "(compiling)"]),
    ("print('stuck', flush=True); time.sleep(60)", 1.0, ["failed: killed after its", "time limit"]),
], ids=["exit", "killed", "timeout"])
async def test_a_child_that_fails_leaves_the_compile_to_the_worker_and_says_why(
        tiny_models, tmp_path, as_on_a_gpu, in_process_compiles, caplog, body, timeout, said):
    worker = _worker(tiny_models, tmp_path, _script(body), timeout=timeout)
    worker.start()
    try:
        with caplog.at_level("INFO", logger="mgie_engine.serving_modes"):
            assert await worker.wait_ready() is WorkerState.READY
            assert await worker.wait_compiled() == "compiled"
        info = worker.info()
    finally:
        worker.shutdown()
    assert len(in_process_compiles) == 1 and not in_process_compiles[0]["artifacts"]
    assert info["mode"] == "compiled" and all(part in info["compile_child"] for part in said)
    warning = next(r.getMessage() for r in caplog.records if "compiling in this process what it left" in r.getMessage())
    assert said[0] in warning and said[1].strip("()") in warning  # what happened, and the tail of its output


async def test_the_child_and_its_own_children_are_killed_when_the_worker_shuts_down(
        tiny_models, tmp_path, as_on_a_gpu, in_process_compiles):
    child = _script("""
        import subprocess
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a compile worker
        (folder / f"pids-{os.environ['MGIE_COMPILE_CHILD_INDEX']}").write_text(f"{os.getpid()} {helper.pid}")
        time.sleep(60)
    """)
    worker = _worker(tiny_models, tmp_path, child, compile_children=3)
    worker.start()
    await worker.wait_ready()
    assert _wait_for(lambda: len(list(tmp_path.rglob("pids-*"))) == 3)
    pids = [int(p) for f in tmp_path.rglob("pids-*") for p in f.read_text().split()]
    assert len(pids) == 6 and all(_alive(pid) for pid in pids)
    worker.shutdown()
    assert worker.join(10)
    assert _wait_for(lambda: not any(_alive(pid) for pid in pids), 5)
    assert await worker.wait_compiled() == "eager" and in_process_compiles == []


def test_a_child_dies_with_its_parent_even_when_the_parent_is_sigkilled(tmp_path):
    """The death signal the child asks for (compile_child.die_with_parent), as its main() does first."""
    pid_file = tmp_path / "pid"
    grandchild = (f"import os, time\nfrom mgie_engine.compile_child import die_with_parent\n"
                  f"die_with_parent(os.getppid())\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                  "time.sleep(60)\n")
    parent_code = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\ntime.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(compile_child.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    try:
        assert _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
        pid = int(pid_file.read_text())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_for(lambda: not _alive(pid), 10)
    finally:
        parent.kill()
        parent.wait(10)


def test_auto_compiles_in_a_child_only_when_the_free_memory_holds_a_second_copy_of_the_models():
    weights = int(15.5 * GiB)  # the full-size models
    need = room_needed(weights)
    assert 30 * GiB < need < 32 * GiB
    assert decide(None, weights, 120 * GiB, warm_cache=False) == (True, f"120.0 GiB free, {need / GiB:.1f} GiB needed")
    assert decide(None, weights, 20 * GiB, warm_cache=False)[0] is False  # a 24-48 GB card: in-process
    assert decide(None, weights, need, warm_cache=False)[0] is True
    assert decide(None, weights, need - 1, warm_cache=False)[0] is False
    assert decide(None, weights, 120 * GiB, warm_cache=True) == (False, "the compile cache is warm")
    assert decide(None, weights, None, warm_cache=False)[0] is False  # no figure (the CPU)
    assert decide(True, weights, 1, warm_cache=True)[0] is True  # MGIE_COMPILE_CHILD=1 forces it
    assert decide(False, weights, 500 * GiB, warm_cache=False)[0] is False


def test_the_warm_up_splits_into_groups_that_compile_apart_and_the_children_share_them():
    """Each guided batch alone (each a compile of its own); the unguided ones together (a lone one is padded
    to the same UNet call); the small-size batch last, so that with five children it pairs with the static
    step at one job, the shortest."""
    batches = warm_up_batches(512, 8)
    groups = compile_groups(512, 8)
    assert groups == [(0,), (1,), (2,), (3,), (5, 6), (4,)] and batches[4][1] == (64, 64)
    assert [batches[k][1:] for k in (0, 1)] == [((512, 512), True)] * 2 and not batches[5][2]
    assert compile_groups(512, 1) == [(0,), (1,), (2,)]
    for count in range(1, len(groups) + 1):
        dealt = shares(groups, count)
        assert len(dealt) == count and sorted(k for share in dealt for k in share) == list(range(len(batches)))
        for group in groups:  # a group never split
            assert sum(set(group) <= set(share) for share in dealt) == 1
    assert shares(groups, 5) == [(0, 4), (1,), (2,), (3,), (5, 6)]
    # how many: one per group, as the free memory holds (each its weights plus 2 GiB, beside the worker's 8 GiB
    # of headroom) and the host's cores (three each), at most MGIE_COMPILE_CHILDREN
    weights = int(15.5 * GiB)
    assert how_many(0, 6, weights, int(114.8 * GiB)) == 6  # an H200 (141 GB) after the worker loaded
    assert how_many(0, 6, weights, int(114.8 * GiB), cores=16) == 5  # ... on its 16-core host
    assert how_many(0, 6, weights, int(114.8 * GiB), cores=2) == 1
    assert how_many(0, 6, weights, 62 * GiB) == 3  # an 80 GB card
    assert how_many(0, 6, weights, room_needed(weights)) == 1  # just room for one (decide's threshold)
    assert how_many(2, 6, weights, 120 * GiB) == 2 and how_many(9, 6, weights, None) == 6
    assert how_many(0, 6, weights, None, cores=2) == 6  # MGIE_COMPILE_CHILD=1 (forced): no figure asked for


@pytest.mark.parametrize(("free_gib", "warm", "child"), [(1000, False, True), (0.1, False, False), (1000, True, False)])
async def test_a_worker_on_auto_asks_the_device_for_its_free_memory(tiny_models, tmp_path, monkeypatch, as_on_a_gpu,
                                                                    in_process_compiles, free_gib, warm, child):
    monkeypatch.setattr(compile_child, "free_bytes", lambda device: int(free_gib * GiB))
    monkeypatch.setattr(compile_cache, "load_artifacts", lambda folder: True)
    if warm:
        monkeypatch.setattr(compile_cache, "cache_folder", lambda *a: tmp_path / "cache")
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / compile_cache.ARTIFACTS_FILE).write_bytes(b"from an earlier start")
    info = await _info_once_compiled(_worker(tiny_models, tmp_path, _script("pass"), compile_child=None))
    if child:
        assert info["compile_child"].startswith("done in")
    else:
        assert info["compile_child"] == ("not used: the compile cache is warm" if warm else
                                         f"not used: 0.1 GiB free, {room_needed(compile_child.model_bytes(tiny_models)) / GiB:.1f} GiB needed")
    assert len(in_process_compiles) == 1


def test_a_compile_that_starts_after_the_child_waits_for_the_serving_loop_in_flight():
    """A loop that began before the device was marked as compiling took no turn: the compile waits for
    its end (or for an idle loop) before it may record."""
    modes = ServingModes()
    modes.loop_idle(False)  # a loop runs
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(modes.wait_for_loop_boundary()))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    modes.loop_done()
    waiter.join(5)
    assert result == [True]
    modes.loop_idle(True)  # waiting for jobs: no GPU work until its next loop, which sees the turns
    assert modes.wait_for_loop_boundary()
    modes.loop_idle(False)
    modes.stop.set()  # shutting down meanwhile
    assert modes.wait_for_loop_boundary() is False


def test_the_switch_interval_is_shortened_while_any_compile_thread_runs_and_restored_after():
    before = sys.getswitchinterval()
    with serving_modes.shorter_switch_interval(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        with serving_modes.shorter_switch_interval(0.0005):  # a second worker's compile
            pass
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # the first one still runs
    assert sys.getswitchinterval() == before
    with serving_modes.shorter_switch_interval(0):  # MGIE_COMPILE_SWITCH_INTERVAL=0: left as it is
        assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), serving_modes.shorter_switch_interval(0.001):
        raise RuntimeError("the warm-up failed")
    assert sys.getswitchinterval() == before


async def test_the_real_child_runs_precompile_with_the_workers_settings(tiny_paths, tiny_models, tmp_path,
                                                                       as_on_a_gpu, in_process_compiles):
    """``python -m mgie_engine.compile_child``: on a CPU its precompile refuses (nothing compiles there), which
    shows it got the worker's settings; the worker then compiles in-process."""
    settings = tiny_settings(tiny_paths, max_side=64, compile=True, compile_child=True, compile_children=2,
                             data_dir=str(tmp_path))
    info = await _info_once_compiled(LocalWorker(settings, loader=lambda _s: tiny_models,
                                                 compile_child=ChildLauncher()))
    assert info["compile_child"].startswith("failed: exit 1")
    # models only the parent has (the benches')
    custom = await _info_once_compiled(LocalWorker(settings, loader=lambda _s: tiny_models))
    assert custom["compile_child"] == "not used: the models come from a custom loader, which a child cannot run"
    logs = sorted(Path(tmp_path).rglob("compile-child-*.log"))
    assert [log.name for log in logs] == ["compile-child-0.log", "compile-child-1.log"]  # MGIE_COMPILE_CHILDREN=2
    shares_seen = []
    for log in logs:
        text = log.read_text()
        assert "nothing to precompile: the pipeline on cpu runs without compiled steps" in text
        assert "loading the weights onto cpu" in text  # it loaded the worker's checkpoints
        shares_seen.append(text.split("warm-up batches ", 1)[1].split()[0])
    assert shares_seen == [",".join(map(str, share)) for share in shares(compile_groups(64, 8), 2)]


def test_precompile_runs_the_children_first_then_the_whole_warm_up_on_their_cache(tiny_models, tmp_path,
                                                                                  monkeypatch, as_on_a_gpu):
    """``mgie-worker --precompile`` (``precompile(children=True)``): the children compile their shares side by
    side, then the whole warm-up runs here, on the cache they filled, and artifacts.bin is saved."""
    from mgie_engine.lifecycle import precompile

    child = _script("""
        index = os.environ["MGIE_COMPILE_CHILD_INDEX"]
        (folder / f"share-{index}").write_text(os.environ["MGIE_COMPILE_CHILD_BATCHES"])
    """)
    seen: list[tuple] = []

    def warm_up(self, max_jobs, only=None):
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent
        seen.append((max_jobs, only, sorted(f.name for f in folder.glob("share-*"))))

    monkeypatch.setattr(MgiePipeline, "warm_up", warm_up)
    monkeypatch.setattr(compile_cache, "save_artifacts",
                        lambda folder, name=compile_cache.ARTIFACTS_FILE: (folder / name).write_bytes(b"x") and folder / name)
    settings = EngineSettings(device="cpu", max_side=64, compile=True, data_dir=str(tmp_path), compile_child=True,
                              compile_children=3)
    path = precompile(settings, 8, loader=lambda _s: tiny_models, children=True,
                      child_launcher=ChildLauncher(command=child))
    assert path.name == compile_cache.ARTIFACTS_FILE and path.is_file()
    assert seen == [(8, None, ["share-0", "share-1", "share-2"])]  # after every child, the whole warm-up
    assert [(path.parent / f"share-{i}").read_text() for i in range(3)] == [
        ",".join(map(str, share)) for share in shares(compile_groups(64, 8), 3)]
    seen.clear()
    for share in path.parent.glob("share-*"):
        share.unlink()
    precompile(settings, 8, loader=lambda _s: tiny_models, child_launcher=ChildLauncher(command=child), only=(2,))
    assert seen == [(8, (2,), [])]  # a child's own precompile (children=False) never starts children


async def test_the_children_start_after_the_edit_sent_as_the_worker_turns_ready(
        tiny_models, tmp_path, monkeypatch, as_on_a_gpu, steps_by_mode, in_process_compiles):
    """On an H200 first start the first edit took 22 s beside the four children's start (their imports and
    weights) instead of ~5 s: the children now give way to it (MGIE_COMPILE_GIVE_WAY), as the in-process
    compile's batches do."""
    started_after: list[int] = []  # eager steps run when the children started
    start = compile_child.ChildRuns.start

    def recording_start(self):
        started_after.append(len(steps_by_mode))
        return start(self)

    monkeypatch.setattr(compile_child.ChildRuns, "start", recording_start)
    monkeypatch.setattr(compile_cache, "load_artifacts", lambda folder: True)
    await test_serving_modes.one_slow_edit_as_the_worker_turns_ready(_worker(tiny_models, tmp_path, _script("pass")),
                                                                     monkeypatch, steps=3)
    assert started_after == [3]
