"""Adapters for agent frameworks, each behind an optional extra so the core SDK stays light.

- ``kvrag_client.integrations.langchain.KVRagRetriever``: ``pip install 'kvrag-client[langchain]'``
- ``kvrag_client.integrations.llama_index.KVRagRetriever``: ``pip install 'kvrag-client[llama-index]'``
"""

from __future__ import annotations

from typing import Any

from ..types import Hit


def hit_metadata(hit: Hit) -> dict[str, Any]:
    """A hit's document metadata plus where it came from in kvrag (ids and score win over same-named keys)."""
    return {**hit.metadata, "doc_id": hit.doc_id, "block_id": hit.block_id, "ordinal": hit.ordinal,
            "score": hit.score, "agent": hit.agent}


def passage_id(hit: Hit) -> str:
    """A stable id of one retrieved passage: its document id and its block's place in the document."""
    return f"{hit.doc_id}#{hit.ordinal}"
