"""LangChain and LlamaIndex retrievers against a live server: documents come back with kvrag ids and scores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from kvrag_client import AsyncKVRag, KVRag

from kvstore.model.loader import Embedder, LoadedModel
from tests.server_harness import LiveServer, live_server, make_key

DOCS = {
    "normans": "The Normans gave their name to Normandy, a region in France.",
    "paris": "Paris is the capital and most populous city of France. The Seine flows through it.",
    "glucose": "Photosynthesis converts light energy into chemical energy stored in glucose.",
}
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llm: LoadedModel, embedder: Embedder) -> Iterator[LiveServer]:
    with live_server("sqlite", tmp_path_factory.mktemp("retrievers"), tiny_llm, embedder) as server:
        with server.admin() as admin:
            assert admin.post("/v1/banks", json={"name": "notes"}).status_code == 201
            docs = [{"id": k, "text": v, "tags": ["geo"] if k != "glucose" else [], "metadata": {"src": k}}
                    for k, v in DOCS.items()]
            assert admin.post("/v1/banks/notes/documents", json={"documents": docs}).status_code == 200
        yield server


@pytest.fixture(scope="module")
def kv(live: LiveServer) -> Iterator[KVRag]:
    with KVRag(live.url, api_key=make_key(live, role="read", banks=["notes"])["key"]) as client:
        yield client


def test_langchain_retriever(live: LiveServer, kv: KVRag) -> None:
    pytest.importorskip("langchain_core", reason="langchain-core is not installed: pip install "
                                                 "-e './client[langchain]'")
    from kvrag_client.integrations.langchain import KVRagRetriever
    from langchain_core.retrievers import BaseRetriever

    retriever = KVRagRetriever(client=kv, bank="notes", k=2)
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke(QUESTION)
    assert docs[0].metadata["doc_id"] == "paris" and docs[0].id == "paris#0"
    assert len(docs) == 2 and docs[0].metadata["score"] >= docs[1].metadata["score"]
    assert docs[0].page_content == DOCS["paris"] and docs[0].metadata["src"] == "paris"

    filtered = KVRagRetriever(client=kv, bank="notes", k=3, filter={"tags": ["geo"]}).invoke("glucose")
    assert {d.metadata["doc_id"] for d in filtered} == {"normans", "paris"}

    async def via_async() -> list[str]:
        async with AsyncKVRag(live.url, api_key=kv._config.api_key) as akv:
            found = await KVRagRetriever(client=kv, async_client=akv, bank="notes", k=1).ainvoke(QUESTION)
        return [d.metadata["doc_id"] for d in found]

    assert asyncio.run(via_async()) == ["paris"]


def test_llama_index_retriever(live: LiveServer, kv: KVRag) -> None:
    pytest.importorskip("llama_index.core", reason="llama-index-core is not installed: pip install "
                                                   "-e './client[llama-index]'")
    from kvrag_client.integrations.llama_index import KVRagRetriever
    from llama_index.core.base.base_retriever import BaseRetriever

    retriever = KVRagRetriever(kv, bank="notes", k=2)
    assert isinstance(retriever, BaseRetriever)
    nodes = retriever.retrieve(QUESTION)
    assert len(nodes) == 2 and nodes[0].score >= nodes[1].score
    top = nodes[0]
    assert top.node.node_id == "paris#0" and top.node.metadata["doc_id"] == "paris" and top.node.ref_doc_id == "paris"
    assert top.node.get_content() == DOCS["paris"]

    async def via_async() -> list[str]:
        async with AsyncKVRag(live.url, api_key=kv._config.api_key) as akv:
            found = await KVRagRetriever(kv, async_client=akv, bank="notes", k=1).aretrieve(QUESTION)
        return [n.node.metadata["doc_id"] for n in found]

    assert asyncio.run(via_async()) == ["paris"]
