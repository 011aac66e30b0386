"""Installing kvrag-client into a fresh venv, with its dependencies resolved by pip, never pulls torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "client"


@pytest.mark.slow  # ~30 s: a venv plus a dependency resolution through pip
def test_client_installs_without_torch(tmp_path: Path) -> None:
    # Build from a copy so the build does not write build/ or egg-info into the shared tree.
    src = tmp_path / "client"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], check=True)

    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True,
                               text=True).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert {"kvrag-client", "httpx", "pydantic"} <= names
    assert not names & {"torch", "transformers", "faiss-cpu", "numpy", "sentence-transformers"}

    probe = ("import importlib.util, sys, kvrag_client; "
             "assert importlib.util.find_spec('torch') is None; "
             "assert kvrag_client.KVRag and 'torch' not in sys.modules; print(kvrag_client.__version__)")
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "0.1.0"
