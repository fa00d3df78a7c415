"""Keep packages the engine never uses out of a worker process's start.

transformers and diffusers import some optional packages at import time merely because they are installed:
transformers before 5.21 imports scikit-learn (``sklearn.metrics``, from its generation code, which pulls in
SciPy, pandas and pyarrow), every transformers 5.x imports ``scipy.optimize`` (its object-detection losses,
through ``modeling_utils``), and diffusers imports ``scipy.stats`` (its schedulers, through the UNet module's
single-file loaders). The engine uses none of them; on a host that has them they add about 1.5 s to a
worker's start on the 2-core CPU VM, and on the H200 host (transformers 5.17) ``sklearn.metrics`` alone took
1.9 s of the 15 s a worker spent importing (bench/results/NVIDIA_H200-importtime-20ms.log).

Both libraries decide whether such a package is installed with ``importlib.util.find_spec``, which answers
None for a name whose ``sys.modules`` entry is None (and ``import`` then raises ModuleNotFoundError), so
marking the names absent before they import anything makes them take their not-installed branches: the
configuration the project's own venv and CI run. The entry points (mgie-bot, mgie-worker, mgie-edit, the compile
children) call it; MGIE_KEEP_OPTIONAL_IMPORTS=1 turns it off, e.g. for a cog of your own that needs pandas."""

from __future__ import annotations

import os
import sys

UNUSED = ("sklearn", "scipy", "pandas", "pyarrow")
KEEP_ENV = "MGIE_KEEP_OPTIONAL_IMPORTS"


def skip_unused_packages(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Mark the ``UNUSED`` packages that are not imported yet as absent in this process; returns their names.
    Call it first thing in a process's entry point, before torch, transformers or diffusers is imported."""
    env = os.environ if environ is None else environ
    if env.get(KEEP_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return ()
    skipped = tuple(name for name in UNUSED if name not in sys.modules)
    for name in skipped:
        sys.modules[name] = None  # type: ignore[assignment]  # the documented "not importable" marker
    return skipped
