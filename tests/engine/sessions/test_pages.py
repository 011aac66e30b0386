"""Paging a session's KV (kvstore.sessions.pages): consecutive pages of at most the page size, in order."""

from __future__ import annotations

import torch

from kvstore.sessions.pages import split_pages
from kvstore.types import BlockKV


def test_split_pages_covers_the_tokens_in_order_with_a_short_last_page() -> None:
    k = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)  # [layers, kv_heads, tokens, head_dim]
    kv = BlockKV(k=k, v=-k)
    pages = split_pages(kv, 4)
    assert [p.tokens for p in pages] == [4, 4, 2]
    assert torch.equal(torch.cat([p.k for p in pages], dim=2), k)
    assert torch.equal(torch.cat([p.v for p in pages], dim=2), -k)
    assert all(p.k.is_contiguous() and p.v.is_contiguous() for p in pages)
    assert split_pages(BlockKV(k=k[:, :, :0], v=k[:, :, :0]), 4) == []
