"""Token ids as the catalog stores them: little-endian int32 bytes (``BlockRow.token_ids``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ids_to_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def bytes_to_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").astype(int).tolist()
