"""The sentence embedder's transformer run by ONNX Runtime: the same vectors as sentence-transformers, sooner.

Every query embeds its question before anything else can start, so the embedding sits whole on the time to
first token. On the 2-core box a question of ~15 tokens through the packaged MiniLM-L6 takes ~12 ms in torch and
~4.5 ms in ONNX Runtime (its small-matrix GEMMs and fused attention; docs/research/ttft-history.md, issue 33).

The transformer is exported once per model and torch release (eager attention: the sdpa path traces shape
decisions into the graph) into the model cache, next to the converted LLM, and checked on every load: probe
sentences of unequal length (padding included) must embed within :data:`TOLERANCE` of sentence-transformers'
own vectors; a cached export that fails is exported again once, and then the embedder stays on torch.
Tokenization and the modules after the transformer (pooling, normalization) are sentence-transformers' own,
so truncation and pooling cannot drift from the torch path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference of a unit vector's coordinate from the torch path's (fp32 sums: ~2e-6)
PROBES = (
    "In what country is Normandy located?",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
    "kvrag",
)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a BERT-like encoder's forward may take


class _Encoder(torch.nn.Module):
    """The transformer with positional inputs and one output, as the exporter wants it."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True))).last_hidden_state  # [batch, tokens, dim]


def _digest(model_dir: Path) -> str:
    """Identity of the embedder's files and of the exporter: a new model or torch release exports again."""
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _export(st_model: Any, target: Path) -> None:
    """Write the transformer of ``st_model`` (a SentenceTransformer) as ONNX to ``target`` (atomically)."""
    transformer = st_model[0].auto_model
    features = st_model.preprocess([PROBES[0], PROBES[1]])
    names = [n for n in _INPUTS if n in features]
    previous = transformer.config._attn_implementation
    transformer.set_attn_implementation("eager")
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks; the probes judge the result
            torch.onnx.export(_Encoder(transformer, names), tuple(features[n] for n in names), str(tmp),
                              input_names=names, output_names=["hidden"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        os.replace(tmp, target)
    finally:
        transformer.set_attn_implementation(previous)
        tmp.unlink(missing_ok=True)


def _exported(st_model: Any, target: Path) -> Path:
    """``target``, the export of ``st_model``, written first when missing (one process exports, others wait)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".embedder-export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            log.info("exporting the embedder to ONNX once into %s", target)
            _export(st_model, target)
    return target


class OnnxTransformer:
    """Runs the exported transformer; :meth:`embed` returns what ``SentenceTransformer.encode`` would."""

    def __init__(self, st_model: Any, path: Path, threads: int, dim: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads must not spin: the LLM's forward needs both cores right after the embedding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._names = [i.name for i in self._session.get_inputs()]
        self._st = st_model
        self.dim = dim

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``[len(texts), dim]`` float32 unit vectors, in the order of ``texts``."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths pad less
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            features = self._st.preprocess([texts[i] for i in chunk])
            hidden = self._session.run(None, {n: features[n].numpy() for n in self._names})[0]
            features["token_embeddings"] = torch.from_numpy(hidden)
            for module in list(self._st)[1:]:  # pooling (and normalization) exactly as sentence-transformers runs it
                features = module(features)
            vecs = features["sentence_embedding"].numpy()
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[chunk] = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return out if out is not None else np.empty((0, self.dim), dtype=np.float32)


def load_onnx(st_model: Any, model_dir: Path, cache_dir: Path, threads: int, dim: int) -> OnnxTransformer | None:
    """The ONNX runner of ``st_model``, or None (logged) when ONNX Runtime is missing or its vectors differ from
    the torch path's on the probes. A cached export that does not load or embeds differently (damaged, or written by
    another exporter) is exported again once before the embedder settles on torch."""
    want = st_model.encode(list(PROBES), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    target: Path | None = None
    problem = ""
    for attempt in range(2):
        try:
            target = target or cache_dir / f"embedder-{_digest(model_dir)}.onnx"
            runner = OnnxTransformer(st_model, _exported(st_model, target), threads, dim)
            diff = float(np.abs(runner.embed(list(PROBES)) - want).max())
        except Exception as exc:  # noqa: BLE001 - any failure keeps the torch path, which is always correct
            problem = f"the ONNX path failed ({exc})"
        else:
            if diff <= TOLERANCE:
                log.info("embedder on ONNX Runtime (%s, %d threads; probe difference %.1g)", model_dir.name, threads,
                         diff)
                return runner
            problem = f"the ONNX export differs by {diff:.2g} on the probes"
        if attempt == 0 and target is not None and target.exists():
            log.warning("embedder: %s; exporting it again", problem)
            target.unlink(missing_ok=True)
        else:
            break
    log.warning("embedder stays on torch: %s", problem)
    return None
