"""A model's codec calibration (``kvstore/codec/weights/*.json``, made by ``bench/codec_calibrate.py``): the
error costs, question statistics and key basis the water-filled and tiered presets encode with.

Only encoding reads the calibration, except for keys coded in a calibrated basis, whose decoding needs the
same basis (:class:`KeyBasis`, named by digest in the block).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).with_name("weights")


@dataclass(frozen=True)
class CodecWeights:
    """A model's measured error costs (``kvstore/codec/weights/*.json``, made by ``bench/codec_calibrate.py``).

    ``keys: [L, H, D]``: KL per unit of squared key range times ``4**-bits`` for one channel (the query
    energy of its RoPE pair over the questions times the head's measured sensitivity); ``values: [L, H]``:
    KL of a head's values at ``4**-bits`` (rotated, symmetric). Only the encoder reads them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None  # [L, QH, D]: the mean question query, placed and scaled (tier presets)
    query_spread: torch.Tensor | None = None  # [L, QH, D, D]: those placed queries' covariance (tier presets)
    key_basis: KeyBasis | None = None  # the calibrated key transform (``klt*`` presets)


@dataclass(frozen=True)
class KeyBasis:
    """A calibrated transform of pre-RoPE keys per (layer, KV head): ``x = k @ forward``, ``k = x @ inverse``.

    ``forward: [L, H, D, D]`` is the KLT of the block-centred keys in the metric of the Fisher information
    of the next-token distribution w.r.t. the keys (``bench/codec_calibrate.py``), scaled to max |entry| 1
    per head, so a coefficient's squared error times ``weight: [L, H]`` is its KL cost: every coefficient
    of every head is priced in the same unit and water-filling needs no other weight. ``digest`` names
    the exact matrices; a block records it, because decoding needs the same basis it was encoded with.
    """

    forward: torch.Tensor
    inverse: torch.Tensor
    weight: torch.Tensor
    digest: str


def query_spread_from_json(raw: dict[str, Any], layers: int, q_heads: int, dim: int) -> torch.Tensor:
    """The ``query_spread`` entry: each covariance's upper triangle (diagonal included, row-major) as fp16
    (base64, little-endian) -> ``[L, QH, D, D]`` symmetric."""
    data = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f2").astype(np.float32)
    rows, cols = torch.triu_indices(dim, dim)
    upper = torch.from_numpy(data.copy()).view(layers, q_heads, rows.numel())
    cov = torch.zeros(layers, q_heads, dim, dim)
    cov[..., rows, cols] = upper
    cov[..., cols, rows] = upper
    return cov


def key_basis_from_json(raw: dict[str, Any], shape: list[int]) -> KeyBasis:
    """The ``key_basis`` entry of a calibration file: fp16 matrices (base64, little-endian) and head weights."""
    data = base64.b64decode(raw["data"])
    layers, heads, dim = shape
    forward = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(layers, heads, dim, dim))
    inverse = torch.linalg.inv(forward.double()).float()
    return KeyBasis(forward=forward, inverse=inverse, weight=torch.tensor(raw["weight"]),
                    digest=hashlib.sha256(data).hexdigest()[:16])


@cache
def codec_weights(layers: int, heads: int, dim: int) -> CodecWeights | None:
    """The calibration whose shape is ``[layers, heads, dim]``, if one ships; else None (uniform costs)."""
    for path in sorted(WEIGHTS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        if raw["shape"] == [layers, heads, dim]:
            queries = torch.tensor(raw["queries"]) if "queries" in raw else None
            spread = (query_spread_from_json(raw["query_spread"], layers, queries.shape[1], dim)
                      if queries is not None and "query_spread" in raw else None)
            basis = key_basis_from_json(raw["key_basis"], raw["shape"]) if "key_basis" in raw else None
            return CodecWeights(keys=torch.tensor(raw["keys"]), values=torch.tensor(raw["values"]), queries=queries,
                                query_spread=spread, key_basis=basis)
    return None
