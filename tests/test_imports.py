"""Every library package imports on its own, first, in a fresh interpreter: no import cycle depends on which
package a user (or a benchmark) happens to import first (`import toolrl_jax.multiturn` once failed that way)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import toolrl_jax
from tests.conftest import REPO_ROOT

_SCRIPT = """
import subprocess, sys
failed = []
for name in sys.argv[1:]:
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    if proc.returncode:
        failed.append(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
print("\\n".join(failed))
"""


def test_every_package_imports_first_in_a_fresh_interpreter():
    names = ["toolrl_jax"] + [m.name for m in pkgutil.walk_packages(toolrl_jax.__path__, "toolrl_jax.") if m.ispkg]
    assert {"toolrl_jax.multiturn", "toolrl_jax.environments", "toolrl_jax.evaluation"} <= set(names)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *names], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout
