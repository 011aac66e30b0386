"""A LangChain retriever over a kvrag bank (``pip install 'kvrag-client[langchain]'``).

    from kvrag_client import KVRag
    from kvrag_client.integrations.langchain import KVRagRetriever

    retriever = KVRagRetriever(client=KVRag("http://127.0.0.1:8000", api_key="..."), bank="notes", k=4)
    docs = retriever.invoke("Who were the Normans?")   # doc.id, doc.metadata["doc_id"], ["score"]
"""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvrag_client.integrations.langchain needs langchain-core: "
                      "pip install 'kvrag-client[langchain]'") from exc
from pydantic import ConfigDict, Field

from .._async_client import AsyncKVRag
from .._client import KVRag
from ..types import Hit, SearchFilter
from . import hit_metadata, passage_id

__all__ = ["KVRagRetriever"]


def to_document(hit: Hit) -> Document:
    """One kvrag hit as a LangChain document: the passage text, kvrag ids and score in the metadata."""
    return Document(page_content=hit.text, metadata=hit_metadata(hit), id=passage_id(hit))


class KVRagRetriever(BaseRetriever):
    """Top-``k`` passages of ``bank`` by similarity (``POST /v1/banks/{bank}/search``).

    ``client`` defaults to ``KVRag()`` (``$KVRAG_URL``, ``$KVRAG_API_KEY``); pass ``async_client`` to make
    ``ainvoke`` truly asynchronous (otherwise LangChain runs the sync call in a thread).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    bank: str
    k: int = Field(default=5, ge=1)
    filter: SearchFilter | dict[str, Any] | None = None
    client: KVRag = Field(default_factory=KVRag)
    async_client: AsyncKVRag | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [to_document(h) for h in self.client.search(self.bank, query, k=self.k, filter=self.filter)]

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        if self.async_client is None:
            return await super()._aget_relevant_documents(query, run_manager=run_manager)
        hits = await self.async_client.search(self.bank, query, k=self.k, filter=self.filter)
        return [to_document(h) for h in hits]
