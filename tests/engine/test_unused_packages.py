"""mgie_engine/unused_packages.py: packages the engine never uses stay out of a worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mgie_engine.unused_packages import KEEP_ENV, UNUSED, skip_unused_packages

ROOT = Path(__file__).resolve().parents[2]

# What a worker imports before its weights: transformers' Llama model (its losses; before 5.21 its generation
# code too) and diffusers' UNet (whose loaders import the schedulers).
PROBE = textwrap.dedent("""
    from mgie_engine.unused_packages import skip_unused_packages
    skip_unused_packages()
    import transformers.models.llama.modeling_llama, transformers.generation.utils
    import diffusers.models.unets.unet_2d_condition
""")
PROBE_SPECS = textwrap.dedent("""
    import importlib.util
    from mgie_engine.unused_packages import skip_unused_packages
    skip_unused_packages()
    print(*[name for name in ("sklearn", "scipy") if importlib.util.find_spec(name) is not None])
""")
FAKE = "import os\nopen(os.path.join(os.path.dirname(__file__), '..', '{name}.imported'), 'w').close()\n"


def _probe(tmp_path: Path, keep: bool, probe: str = PROBE) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``probe`` with fake sklearn and scipy packages installed, which leave a file behind when imported."""
    for name in ("sklearn", "scipy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(FAKE.format(name=name))
    env = {k: v for k, v in os.environ.items() if k != KEEP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(tmp_path), env.get("PYTHONPATH")) if p)
    if keep:
        env[KEEP_ENV] = "1"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    return run, sorted(p.stem for p in tmp_path.glob("*.imported"))


def test_the_model_libraries_never_import_them(tmp_path):
    run, imported = _probe(tmp_path, keep=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert imported == []


def test_with_mgie_keep_optional_imports_they_stay_importable(tmp_path):
    run, _ = _probe(tmp_path, keep=True, probe=PROBE_SPECS)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["sklearn", "scipy"]  # found, so the libraries would import them


def test_an_imported_package_is_left_alone(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "pandas", sentinel)
    for name in ("sklearn", "scipy", "pyarrow"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    skipped = skip_unused_packages({})
    try:
        assert sys.modules["pandas"] is sentinel
        assert set(skipped) == set(UNUSED) - {"pandas"} and all(sys.modules[n] is None for n in skipped)
    finally:
        for name in skipped:
            del sys.modules[name]
    assert skip_unused_packages({KEEP_ENV: "1"}) == ()
