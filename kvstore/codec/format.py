"""KV block <-> bytes: a self-describing, versioned, checksummed format. No pickle, no torch.load.

Layout::

    b"KVRB" | u16 format version | u32 header length | header (UTF-8 JSON) | payload | sha256

The header names the model fingerprint, the shape, the codec preset and its parameters, the key
convention (``pre_rope``) and the payload sections (name, dtype, shape). The payload holds the
sections' raw little-endian bytes, zstd-compressed as the header's ``compression`` says: version 2
writes ``zstd-sections``, one zstd frame per section (its size in the section's ``stored``), because
zstd's Huffman tables then fit each section's own byte distribution (quantized codes, scales and
widths differ), so blocks come out smaller than with one frame over them all, which is how version 1
wrote every block (``zstd``) and what it still reads. The sha256 covers everything before it.
Presets register themselves in ``PRESETS``; a block always decodes with the preset named in its own
header, so changing a bank's default never strands older blocks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import zstandard

from kvstore.codec.calibration import codec_weights
from kvstore.codec.presets import LOSSY_PRESETS
from kvstore.errors import CorruptBlock, IncompatibleModel, ValidationFailed
from kvstore.types import BlockKV

MAGIC = b"KVRB"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_PREAMBLE = struct.Struct("<4sHI")
_DIGEST = 32
_ZSTD_LEVEL = 3
_ALLOWED_DTYPES = {"float16", "float32", "int8", "uint8", "int16", "int32"}
# Largest block a header may declare (K values; V as many): 2^28 is 1 GiB of fp32 K. A block holds at most
# ``block_tokens`` (4096) tokens, a session page fewer, so real blocks stay far below it.
MAX_BLOCK_VALUES = 1 << 28


Sections = dict[str, np.ndarray]


class Preset(Protocol):
    """A codec preset turns a block's K/V into named arrays and back."""

    @property
    def name(self) -> str: ...

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]: ...

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int, int, int]
               ) -> BlockKV: ...


class Fp16Preset:
    """Lossless for fp16 tensors: K (pre-RoPE) and V cast to fp16, then zstd."""

    name = "fp16"

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        k = block.k.detach().to("cpu", torch.float16).contiguous().numpy()
        v = block.v.detach().to("cpu", torch.float16).contiguous().numpy()
        return {"k": k, "v": v}, {}

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, int, int, int]
               ) -> BlockKV:
        return BlockKV(k=sections["k"].reshape(shape), v=sections["v"].reshape(shape))


PRESETS: dict[str, Preset] = {"fp16": Fp16Preset()}
# The lossy presets and what they cost are measured by bench/codec.py (docs/research/codecs.md).
for _preset in LOSSY_PRESETS:
    PRESETS[_preset.name] = _preset


CALIBRATED_DEFAULT = "tklt5"  # ~5x smaller than fp16 at the agreement bound, for a calibrated model
UNCALIBRATED_DEFAULT = "int8"  # ~2x, lossless in practice, for any model


def default_codec(setting: str, layers: int, kv_heads: int, head_dim: int) -> str:
    """The codec a new bank gets: ``setting`` itself, or for ``auto`` :data:`CALIBRATED_DEFAULT` where
    ``kvstore/codec/weights`` holds this model shape's key basis and question statistics (without them its
    tiers and key basis fall back to guesses no benchmark has measured), else :data:`UNCALIBRATED_DEFAULT`."""
    if setting != "auto":
        return setting
    weights = codec_weights(layers, kv_heads, head_dim)
    calibrated = weights is not None and weights.key_basis is not None and weights.query_spread is not None
    return CALIBRATED_DEFAULT if calibrated else UNCALIBRATED_DEFAULT


# What a new bank or a bank update may choose. Every other preset in PRESETS stays registered so blocks (and
# banks) written with it keep decoding and writing; by bench/codec.py's table each of them is
# either a research variant or beaten on both ratio and agreement, so users are not offered them.
CHOOSABLE = ("auto", "fp16", "int8", "tklt5")


def check_choosable(name: str) -> None:
    """Refuse a codec a bank may not newly choose (a 4xx), before anything is stored."""
    if name not in CHOOSABLE:
        raise ValidationFailed(f"codec {name!r} can't be chosen for a bank; choose one of {', '.join(CHOOSABLE)} "
                               "(blocks stored with other presets keep decoding)")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValidationFailed(f"unknown codec {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class BlockHeader:
    fingerprint: str
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    key_convention: str = "pre_rope"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.tokens, self.head_dim)


def encode_block(block: BlockKV, fingerprint: str, codec: str) -> bytes:
    """Serialize a block with the named preset; the result is content-addressable bytes."""
    preset = get_preset(codec)
    layers, heads, tokens, dim = block.k.shape
    sections, params = preset.encode(block)
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    frames = [compressor.compress(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
              for a in sections.values()]
    header = {
        "fingerprint": fingerprint, "layers": layers, "kv_heads": heads, "tokens": tokens, "head_dim": dim,
        "codec": preset.name, "params": params, "key_convention": "pre_rope", "compression": "zstd-sections",
        "sections": [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape), "stored": len(f)}
                     for (n, a), f in zip(sections.items(), frames, strict=True)],
    }
    payload = b"".join(frames)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def read_header(data: bytes) -> tuple[BlockHeader, dict[str, Any], bytes]:
    """Verify magic, version and checksum; return the header and the compressed payload.

    Anything wrong with the bytes is a :class:`CorruptBlock` (the caller quarantines and rebuilds), never a
    raw exception: a block with a valid checksum may still have been written by someone else.
    """
    if len(data) < _PREAMBLE.size + _DIGEST:
        raise CorruptBlock("block is truncated")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    magic, version, head_len = _PREAMBLE.unpack_from(body)
    if magic != MAGIC:
        raise CorruptBlock("not a kvrag block (bad magic)")
    if version not in _READABLE_VERSIONS:
        raise CorruptBlock(f"unsupported block format version {version}")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptBlock("block checksum mismatch")
    if _PREAMBLE.size + head_len > len(body):
        raise CorruptBlock("block header longer than the block")
    try:
        raw_header = json.loads(body[_PREAMBLE.size:_PREAMBLE.size + head_len])
        if not isinstance(raw_header, dict):
            raise TypeError("header is not an object")
        params = raw_header.get("params", {})
        if not isinstance(params, dict):
            raise TypeError("params is not an object")
        header = BlockHeader(
            fingerprint=str(raw_header["fingerprint"]), layers=_count(raw_header["layers"]),
            kv_heads=_count(raw_header["kv_heads"]), tokens=_count(raw_header["tokens"]),
            head_dim=_count(raw_header["head_dim"]), codec=str(raw_header["codec"]),
            params=dict(params), key_convention=str(raw_header["key_convention"]),
        )
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CorruptBlock(f"unreadable block header: {exc}") from None
    section_specs(raw_header)
    return header, raw_header, body[_PREAMBLE.size + head_len:]


def _count(value: Any) -> int:
    """A non-negative integer field of the header (JSON allows floats, strings, NaN and Infinity: refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


@dataclass(frozen=True)
class SectionSpec:
    """One payload section as the header declares it, checked: its decoded size is known before decompressing."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    stored: int | None  # compressed size (version 2); None in version 1's single frame

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize if self.shape else self.dtype.itemsize


def section_specs(raw_header: dict[str, Any]) -> list[SectionSpec]:
    """The header's sections, each a known dtype and shape, together no larger than the block's KV can be.

    The bound is what makes decompression safe: the payload may never decode to more than these sizes, so a
    zstd bomb (a tiny frame claiming gigabytes) is refused before anything is allocated.
    """
    try:
        return _section_specs(raw_header)
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CorruptBlock(f"unreadable block sections: {exc}") from None


def _section_specs(raw_header: dict[str, Any]) -> list[SectionSpec]:
    raw = raw_header.get("sections")
    if not isinstance(raw, list):
        raise TypeError("sections is not a list")
    values = 1
    for key in ("layers", "kv_heads", "tokens", "head_dim"):
        values *= _count(raw_header[key])
    if values > MAX_BLOCK_VALUES:
        raise CorruptBlock(f"block shape exceeds {MAX_BLOCK_VALUES} values")
    specs, total = [], 0
    for spec in raw:
        if not isinstance(spec, dict):
            raise TypeError("section is not an object")
        dtype = str(spec["dtype"])
        if dtype not in _ALLOWED_DTYPES:
            raise CorruptBlock(f"section dtype {dtype!r} not allowed")
        shape = spec["shape"]
        if not isinstance(shape, list):
            raise TypeError("section shape is not a list")
        dims = tuple(_count(d) for d in shape)
        stored = _count(spec["stored"]) if "stored" in spec else None
        size = 1
        for dim in dims:
            size *= dim
            if size > _section_budget(values):
                raise CorruptBlock("block sections larger than its shape allows")
        section = SectionSpec(name=str(spec["name"]), dtype=np.dtype(dtype).newbyteorder("<"), shape=dims,
                              stored=stored)
        total += section.nbytes
        if total > _section_budget(values):
            raise CorruptBlock("block sections larger than its shape allows")
        specs.append(section)
    return specs


def _section_budget(values: int) -> int:
    """Decoded bytes a block of ``values`` K (and as many V) values may hold: both in fp32, plus room for the
    presets' small side tables (scales, widths, bases)."""
    return 2 * 4 * values + (1 << 20)


def _decompress(decompressor: zstandard.ZstdDecompressor, frame: bytes, expected: int) -> bytes:
    """One zstd frame that must decode to exactly ``expected`` bytes, never allocating more.

    python-zstandard ignores ``max_output_size`` when the frame header states its content size (it allocates
    that size), so the stated size is checked first.
    """
    stated = zstandard.frame_content_size(frame)
    if stated not in (-1, expected):
        raise CorruptBlock(f"block payload claims {stated} bytes where the header declares {expected}")
    if expected == 0:
        out = b""
    else:
        out = decompressor.decompress(frame, max_output_size=expected)
    if len(out) != expected:
        raise CorruptBlock(f"block payload decodes to {len(out)} bytes where the header declares {expected}")
    return out


def payload_bytes(raw_header: dict[str, Any], payload: bytes) -> bytes:
    """The sections' raw bytes, concatenated in header order, from either payload layout (bounded: see
    :func:`section_specs`)."""
    decompressor = zstandard.ZstdDecompressor()
    specs = section_specs(raw_header)
    try:
        compression = raw_header.get("compression", "zstd")
        if compression == "zstd":
            return _decompress(decompressor, payload, sum(spec.nbytes for spec in specs))
        if compression != "zstd-sections":
            raise CorruptBlock(f"unknown block compression {compression!r}")
        parts, offset = [], 0
        for spec in specs:
            if spec.stored is None or offset + spec.stored > len(payload):
                raise CorruptBlock("block payload shorter than its header says")
            parts.append(_decompress(decompressor, payload[offset:offset + spec.stored], spec.nbytes))
            offset += spec.stored
        if offset != len(payload):
            raise CorruptBlock("block payload longer than its sections")
        return b"".join(parts)
    except zstandard.ZstdError as exc:
        raise CorruptBlock(f"block payload does not decompress: {exc}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptBlock(f"unreadable block sections: {exc}") from None


def decode_block(data: bytes, fingerprint: str | None = None, device: torch.device | str | None = None) -> BlockKV:
    """Parse and verify a block; refuse corruption and KV of another model.

    With ``device`` the sections are moved there before the preset decodes them, so dequantization and SVD
    reconstruction run as torch ops on that device (the GPU) and only the compact sections cross the bus.
    """
    header, raw_header, payload = read_header(data)
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise IncompatibleModel("block was produced by another model (fingerprint mismatch)")
    if header.key_convention != "pre_rope":
        raise CorruptBlock(f"unsupported key convention {header.key_convention!r}")
    preset = PRESETS.get(header.codec)
    if preset is None:
        raise CorruptBlock(f"block uses unknown codec {header.codec!r}")
    raw = payload_bytes(raw_header, payload)
    sections: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in section_specs(raw_header):
        end = offset + spec.nbytes
        count = spec.nbytes // spec.dtype.itemsize
        arr = np.frombuffer(raw, dtype=spec.dtype, count=count, offset=offset).reshape(spec.shape)
        section = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        sections[spec.name] = section if device is None else section.to(device)
        offset = end
    try:
        # Factory calls inside a preset (index tensors, scratch buffers) land on the sections' device too.
        with torch.device(device) if device is not None else nullcontext():
            return preset.decode(sections, header.params, header.shape)
    except torch.OutOfMemoryError:
        raise  # the device is full, the block is fine: quarantining it would lose good data
    except (ArithmeticError, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        # The params are whatever JSON the header holds: any way a preset trips over them is a corrupt block.
        raise CorruptBlock(f"block sections do not match preset {header.codec!r}: {exc}") from None
