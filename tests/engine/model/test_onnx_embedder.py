"""The embedder on ONNX Runtime: the torch path's vectors, a verified cached export, and the fallback to torch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from kvstore.config import Settings
from kvstore.model import onnx_embedder
from kvstore.model.loader import Embedder

# Unequal lengths (padding inside a batch), one past the embedder's 256-token limit (truncation), and more
# texts than one batch of 32, in an order that sorting by length changes.
TEXTS = ([f"Question {i}: who ruled Normandy in the year {900 + i}?" for i in range(30)]
         + ["The Normans " * 200, "short", "a " * 40, "Rollo", "Richard I of Normandy " * 3, "x"] * 2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def onnx(cache: Path) -> Embedder:
    return Embedder(Settings(data_dir=cache / "data", model_cache_dir=cache))


@pytest.fixture(scope="module")
def torch_path(cache: Path) -> Embedder:
    return Embedder(Settings(data_dir=cache / "data", model_cache_dir=cache, embedder_backend="torch"))


def test_onnx_is_the_default_and_gives_the_torch_vectors(onnx: Embedder, torch_path: Embedder) -> None:
    assert onnx.backend == "onnx" and torch_path.backend == "torch"
    got, want = onnx.embed(TEXTS), torch_path.embed(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), onnx.dim) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Order kept: each text's vector is the one it gets alone.
    for i in (0, 30, 31, 35):
        assert np.abs(onnx.embed([TEXTS[i]])[0] - got[i]).max() < 1e-5
    assert onnx.embed([]).shape == (0, onnx.dim)


def test_the_export_is_cached_and_reused(onnx: Embedder, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports = list(cache.glob("embedder-*.onnx"))
    assert len(exports) == 1

    def refuse(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_embedder, "_export", refuse)
    again = Embedder(Settings(data_dir=cache / "data", model_cache_dir=cache))
    assert again.backend == "onnx"


def test_a_damaged_export_is_exported_again(onnx: Embedder, cache: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    (export,) = cache.glob("embedder-*.onnx")
    damaged = tmp_path / "cache"
    damaged.mkdir()
    (damaged / export.name).write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING):
        embedder = Embedder(Settings(data_dir=tmp_path / "data", model_cache_dir=damaged))
    assert embedder.backend == "onnx"
    assert "exporting it again" in caplog.text
    assert (damaged / export.name).read_bytes() != b"not a model"
    assert np.abs(embedder.embed(["Rollo"]) - onnx.embed(["Rollo"])).max() < 1e-5


def test_onnx_runtime_failing_falls_back_to_torch(onnx: Embedder, cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no runtime here")

    copied = tmp_path / "cache"
    shutil.copytree(cache, copied, ignore=shutil.ignore_patterns("data", ".*"))
    monkeypatch.setattr(onnx_embedder.OnnxTransformer, "__init__", broken)
    with caplog.at_level(logging.WARNING):
        embedder = Embedder(Settings(data_dir=tmp_path / "data", model_cache_dir=copied))
    assert embedder.backend == "torch"
    assert "stays on torch" in caplog.text and "no runtime here" in caplog.text
    assert embedder.embed(["Rollo"]).shape == (1, embedder.dim)


def test_an_export_that_embeds_differently_is_not_used(onnx: Embedder, cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    shifted = tmp_path / "cache"
    shutil.copytree(cache, shifted, ignore=shutil.ignore_patterns("data", ".*"))
    real = onnx_embedder.OnnxTransformer.embed

    def off(self: onnx_embedder.OnnxTransformer, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return real(self, texts, batch_size) + 10 * onnx_embedder.TOLERANCE

    monkeypatch.setattr(onnx_embedder.OnnxTransformer, "embed", off)
    with caplog.at_level(logging.WARNING):
        embedder = Embedder(Settings(data_dir=tmp_path / "data", model_cache_dir=shifted))
    assert embedder.backend == "torch"
    assert "differs" in caplog.text
