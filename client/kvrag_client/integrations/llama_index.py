"""A LlamaIndex retriever over a kvrag bank (``pip install 'kvrag-client[llama-index]'``).

    from kvrag_client import KVRag
    from kvrag_client.integrations.llama_index import KVRagRetriever

    retriever = KVRagRetriever(KVRag("http://127.0.0.1:8000", api_key="..."), bank="notes", k=4)
    nodes = retriever.retrieve("Who were the Normans?")   # node.score, node.node.metadata["doc_id"]
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvrag_client.integrations.llama_index needs llama-index-core: "
                      "pip install 'kvrag-client[llama-index]'") from exc

from .._async_client import AsyncKVRag
from .._client import KVRag
from ..types import Hit, SearchFilter
from . import hit_metadata, passage_id

__all__ = ["KVRagRetriever"]


def to_node(hit: Hit) -> NodeWithScore:
    """One kvrag hit as a scored text node whose source document is the kvrag document."""
    node = TextNode(id_=passage_id(hit), text=hit.text, metadata=hit_metadata(hit),
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.doc_id)})
    return NodeWithScore(node=node, score=hit.score)


class KVRagRetriever(BaseRetriever):
    """Top-``k`` passages of ``bank`` by similarity (``POST /v1/banks/{bank}/search``); ``aretrieve`` uses
    ``async_client`` when given, else the sync client."""

    def __init__(self, client: KVRag | None = None, *, bank: str, k: int = 5,
                 filter: SearchFilter | dict[str, Any] | None = None, async_client: AsyncKVRag | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client or KVRag()
        self.async_client = async_client
        self.bank = bank
        self.k = k
        self.filter = filter

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [to_node(h) for h in self.client.search(self.bank, query_bundle.query_str, k=self.k,
                                                       filter=self.filter)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.async_client is None:
            return self._retrieve(query_bundle)
        hits = await self.async_client.search(self.bank, query_bundle.query_str, k=self.k, filter=self.filter)
        return [to_node(h) for h in hits]
