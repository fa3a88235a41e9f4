"""The package as users install it (issue 19, item 5): a wheel built from the repository installs into a fresh
virtual environment (offline: no index, its dependencies already there) and ``fastxlstm --version`` runs from
it, importing the installed copy rather than this checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import fastxlstm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # build from a copy: an in-tree build would write build/ and *.egg-info here
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, env=env, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fastxlstm-*.whl")
    assert wheel.name.startswith(f"fastxlstm-{fastxlstm.__version__}-")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
    # the test interpreter's packages (torch, ...) as the new venv's "system" site-packages (so nothing is
    # downloaded); appended after the venv's own, and their .pth files (an editable fastxlstm) not run
    Path(purelib, "_outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([*pip, "--python", str(py), "install", "--no-index", "-q", str(wheel)], check=True, env=env,
                   timeout=300)
    out = subprocess.run([str(venv / "bin" / "fastxlstm"), "--version"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"fastxlstm {fastxlstm.__version__}"
    where = subprocess.run([str(py), "-c", "import fastxlstm; print(fastxlstm.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout
