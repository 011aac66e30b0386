"""Device-aware query path: layered assembly, GPU-resident blocks, on-device decode, pinned hot tier.

The CPU tests run the layer-by-layer assembly the CUDA worker uses (in order, without a copy stream) and
check it against the one-pass CPU assembly; the ``gpu`` tests run the real CUDA path and skip without it.
"""

from __future__ import annotations

import pytest
import torch

from kvstore.codec.format import PRESETS, decode_block, encode_block
from kvstore.errors import BadRequest
from kvstore.memory.hot import HotCache
from kvstore.model.device import PendingLayer, ResidentBlocks, ResidentKV, h2d_bandwidth
from kvstore.model.loader import LoadedModel, model_dtype, resolve_device
from kvstore.model.runner import Runner
from kvstore.types import BlockKV
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCKS = ["The Normans gave their name to Normandy.", "Paris is the capital of France.",
          "Photosynthesis converts light energy."]


def _runner(kind: str = "llama", **kwargs: object) -> Runner:
    return Runner(build_tiny(kind, **TINY_FAMILIES[kind]), "You are a helpful assistant.", **kwargs)


def _keyed(runner: Runner) -> list[BlockKV]:
    blocks = runner.encode([runner.tokenize(t) for t in BLOCKS])
    return [BlockKV(k=b.k.half(), v=b.v.half(), key=f"blob-{i}") for i, b in enumerate(blocks)]


def _kv(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([layer.keys for layer in ctx.cache.layers]),
            torch.stack([layer.values for layer in ctx.cache.layers]))


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_layered_assembly_matches_one_pass(kind: str) -> None:
    runner = _runner(kind, device_cache_bytes=1 << 30)
    blocks = _keyed(runner)
    one = runner.assemble(blocks)
    layered = runner.assemble_layered(blocks)
    assert (layered.next_position, layered.context_tokens) == (one.next_position, one.context_tokens)
    k1, v1 = _kv(one)
    k2, v2 = _kv(layered)
    torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, v1)
    q = runner.question_ids("Who gave their name to Normandy?")
    torch.testing.assert_close(runner.logits(layered, q), runner.logits(one, q), rtol=1e-4, atol=1e-4)


def test_resident_blocks_are_not_copied_again() -> None:
    runner = _runner(device_cache_bytes=1 << 30)
    blocks = _keyed(runner)
    runner.assemble_layered(blocks[:2])
    assert len(runner.resident) == 2 and runner.resident.hits == 0
    runner.assemble_layered(blocks)
    assert len(runner.resident) == 3 and runner.resident.hits == 2
    # A block without a key (a cold block's fresh KV) is used but never kept.
    runner.assemble_layered([BlockKV(k=blocks[0].k, v=blocks[0].v)])
    assert len(runner.resident) == 3 and runner.resident.hits == 2


def test_resident_budget_evicts_least_recently_used() -> None:
    item = ResidentKV(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8))  # 1 KiB
    cache = ResidentBlocks(budget_bytes=2 * item.nbytes)
    cache.put("a", item)
    cache.put("b", item)
    assert cache.get("a") is item  # "a" is now the most recent
    cache.put("c", item)
    assert cache.get("b") is None and cache.get("a") is item and cache.get("c") is item
    assert cache.nbytes == 2 * item.nbytes
    cache.keep(None, item)
    assert len(cache) == 2 and cache.lookup(None) is None  # a block with no cache key is never resident


def test_cpu_assembly_hands_its_buffer_to_the_cache_without_a_copy() -> None:
    runner = _runner()
    ctx = runner.assemble(_keyed(runner))
    layers = ctx.cache.layers
    assert all(isinstance(layer, PendingLayer) for layer in layers)
    # Every layer is a view of one [layers, 1, heads, tokens, dim] allocation.
    first = layers[0].keys
    stride = layers[1].keys.data_ptr() - first.data_ptr()
    assert stride == first.numel() * first.element_size()
    assert ctx.cache.get_seq_length() == ctx.next_position


@pytest.mark.parametrize("codec", sorted(PRESETS))
def test_decode_on_a_named_device_matches_the_default(codec: str) -> None:
    runner = _runner()
    block = runner.encode([runner.tokenize(BLOCKS[0])])[0]
    data = encode_block(block, "fp", codec)
    plain, placed = decode_block(data, "fp"), decode_block(data, "fp", device="cpu")
    torch.testing.assert_close(placed.k, plain.k)
    torch.testing.assert_close(placed.v, plain.v)


def test_device_setting() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert model_dtype(torch.device("cpu")) == torch.float32
    assert model_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(BadRequest):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(BadRequest):
            resolve_device("cuda")


def test_cpu_hot_tier_keeps_blocks_as_they_are() -> None:
    hot = HotCache(1 << 20)
    block = BlockKV(k=torch.ones(1, 1, 2, 4), v=torch.ones(1, 1, 2, 4))
    assert hot.put(1, "x", block) is block
    assert hot.get(1, "x") is block and hot.get(2, "x") is None


# -- CUDA -----------------------------------------------------------------------------------------


def _cuda(kind: str = "llama") -> LoadedModel:
    llm = build_tiny(kind, **TINY_FAMILIES[kind])
    llm.model.to(device="cuda", dtype=torch.bfloat16)
    return llm


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_cuda_layered_assembly_matches_the_cpu_reference(kind: str) -> None:
    runner = Runner(_cuda(kind), "You are a helpful assistant.", device_cache_bytes=1 << 30)
    assert runner.layered
    blocks = [BlockKV(k=b.k.cpu(), v=b.v.cpu(), key=f"b{i}")
              for i, b in enumerate(runner.encode([runner.tokenize(t) for t in BLOCKS]))]
    hot = HotCache(1 << 30, pin_dtype=torch.bfloat16)
    for b in blocks:
        hot.put(1, str(b.key), b)
    pinned_blocks = [hot.get(1, str(b.key)) for b in blocks]
    assert all(b is not None and b.k.is_pinned() and b.k.dtype == torch.bfloat16 for b in pinned_blocks)
    ctx = runner.assemble([b for b in pinned_blocks if b is not None])
    assert runner.resident.copies == 3 and runner.resident.hits == 0
    # The reference: the same blocks rotated in one pass on the CPU.
    pk, pv = runner.prefix_kv
    p = pk.shape[2]
    k_pre = torch.cat([b.k.float() for b in blocks], dim=2)
    n = k_pre.shape[2]
    k_ref = torch.cat((pk.float().cpu(), runner.rope.rotate(k_pre.cuda(), torch.arange(p, p + n)).cpu()), dim=2)
    k_got, v_got = _kv(ctx)
    torch.testing.assert_close(k_got[:, 0].float().cpu(), k_ref, rtol=2e-2, atol=2e-2)
    v_ref = torch.cat((pv.float().cpu(), torch.cat([b.v.float() for b in blocks], dim=2)), dim=2)
    torch.testing.assert_close(v_got[:, 0].float().cpu(), v_ref, rtol=2e-2, atol=2e-2)
    runner.assemble([b for b in pinned_blocks if b is not None])
    assert runner.resident.copies == 3 and runner.resident.hits == 3


@pytest.mark.gpu
def test_cuda_decode_runs_on_the_device() -> None:
    block = BlockKV(k=torch.randn(2, 2, 70, 16), v=torch.randn(2, 2, 70, 16))
    for codec in sorted(PRESETS):
        data = encode_block(block, "fp", codec)
        on_gpu, on_cpu = decode_block(data, "fp", device="cuda"), decode_block(data, "fp")
        assert on_gpu.k.device.type == "cuda"
        torch.testing.assert_close(on_gpu.k.cpu(), on_cpu.k, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(on_gpu.v.cpu(), on_cpu.v, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_pinned_bandwidth_is_measured() -> None:
    assert h2d_bandwidth(16 << 20, repeats=2) > 1e9  # any PCIe link moves more than 1 GB/s


def _index_with(n: int, dim: int = 16):
    import numpy as np

    from kvstore.storage.index import BankIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = BankIndex(dim)
    index.add(np.arange(n, dtype="int64"), vectors)
    return index, vectors


def test_faiss_search_stays_on_the_cpu_without_faiss_gpu() -> None:
    from kvstore.storage.index import gpu_resources

    index, vectors = _index_with(50)
    if gpu_resources() is not None:
        pytest.skip("faiss-gpu sees a GPU here")
    assert index._on_gpu() is None
    ids, _ = index.search(vectors[7], 3)
    assert ids[0] == 7


@pytest.mark.gpu
def test_faiss_gpu_search_matches_the_cpu_and_follows_changes() -> None:
    import numpy as np

    from kvstore.storage.index import gpu_resources

    if gpu_resources() is None:
        pytest.skip("faiss-gpu is not installed (README: GPU search)")
    index, vectors = _index_with(500)
    ids, scores = index.search(vectors[42], 5)
    cpu_scores, cpu_ids = index.index.search(vectors[42][None], 5)
    assert index._on_gpu() is not None
    assert ids.tolist() == cpu_ids[0].tolist()
    np.testing.assert_allclose(scores, cpu_scores[0], rtol=1e-5)
    index.remove(np.array([42], dtype="int64"))
    assert 42 not in index.search(vectors[42], 5)[0].tolist()  # the GPU copy was made again


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_in_place_rotation_matches_the_reference(kind: str) -> None:
    runner = _runner(kind)
    k = torch.randn(runner.num_layers, runner.kv_heads, 37, runner.head_dim)
    positions = torch.arange(100, 137)
    placed = k.clone()
    runner.rope.place_inplace(placed, positions)
    torch.testing.assert_close(placed, runner.rope.rotate(k, positions), rtol=1e-5, atol=1e-5)


def test_in_place_rotation_leaves_channels_past_a_partial_rotary_alone() -> None:
    from kvstore.model.rope import ModelRope

    k = torch.randn(2, 2, 5, 16)
    angles = torch.rand(5, 4) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # rot = 8 of 16
    placed = k.clone()
    ModelRope.rotate_inplace(placed, cos, sin)
    torch.testing.assert_close(placed, ModelRope._rotate_group(k, cos, sin, inverse=False))
    assert torch.equal(placed[..., 8:], k[..., 8:])
