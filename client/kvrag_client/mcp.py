"""kvrag as an MCP server: memory tools for agents (remember, recall, ask, forget, context_map, context_map_edit,
session_append, session_brief). Needs the ``mcp`` extra: ``pip install 'kvrag-client[mcp]'``.

The tools only speak the REST contract, through the SDK: ``kvrag mcp`` (stdio) points the SDK at a kvrag
server, and the server's own ``/mcp`` mount (``server.mcp_http``) points it at the app in process, with
the caller's API key. Both import the tools from here, so the server never imports the CLI package.
Either way the key's scope applies exactly as it does on the REST API, and every failure comes back as a
tool error whose structured content carries the kvrag error ``code``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from ._async_client import AsyncKVRag
from ._exceptions import APIConnectionError, APIError, KVRagError, NotFound
from .types import ContextMapEdit, ContextMapFeedback, Hit

INSTRUCTIONS = (
    "Long-term memory shared with other agents (one kvrag bank). `remember` stores a text, `recall` finds "
    "stored passages, `ask` answers a question from memory, `forget` deletes a memory by id. `context_map` "
    "reads the bank's small map of what it holds and what earlier work found; `context_map_edit` updates it. "
    "`session_append` adds a step to an agent session kept as KV; `session_brief` answers a task from it."
)


@dataclass(frozen=True)
class Memory:
    """What a tool call works on: an SDK client carrying one API key, and the bank of the session."""

    kv: AsyncKVRag
    bank: str


# Opens the ``Memory`` for one tool call; it may read the call's HTTP headers (the key) from the context.
Connector = Callable[[Context], AbstractAsyncContextManager[Memory]]


# -- structured results ------------------------------------------------------------------------------


class Passage(BaseModel):
    """A stored passage: ``doc_id`` is the memory's id (what ``forget`` takes), ``score`` its similarity."""

    doc_id: str
    block_id: int
    ordinal: int
    score: float
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    agent: str | None = None


class Remembered(BaseModel):
    doc_id: str
    version: int
    created: bool
    changed: bool
    tokens: int


class Recalled(BaseModel):
    passages: list[Passage]


class Answer(BaseModel):
    answer: str
    sources: list[Passage]
    context_tokens: int
    generated_tokens: int
    ttft_ms: float


class Forgotten(BaseModel):
    doc_id: str
    deleted: bool


class SessionAppended(BaseModel):
    """``segment_id`` is the new segment's id in the session; ``tokens`` the session's live KV tokens."""

    session_id: str
    segment_id: int
    segment_tokens: int
    tokens: int


class SessionBrief(BaseModel):
    answer: str
    kept_tokens: int
    session_tokens: int
    ttft_ms: float


class SessionRestored(BaseModel):
    """``restored``: segments live again; ``expired``: pruned too long ago, their KV is gone."""

    session_id: str
    restored: list[int]
    tokens: int
    expired: list[int]


class ContextMap(BaseModel):
    """The bank's context map as the server returns it (``items`` keep every field the server sends)."""

    version: int
    budget_tokens: int
    tokens: int
    items: list[dict[str, Any]]


class MapEdit(BaseModel):
    """add (section, content) | replace (id, content) | delete (id); ids are assigned by the server."""

    op: Literal["add", "replace", "delete"]
    id: str | None = Field(default=None, description="The item, e.g. cu-3 (replace, delete).")
    section: Literal["roadmap", "understanding", "reusable_results"] | None = Field(
        default=None, description="Where an added item goes.")
    content: str | None = Field(default=None, description="The item's text (add, replace).")


class MapFeedback(BaseModel):
    id: str = Field(description="The item, e.g. cu-3.")
    tag: Literal["helpful", "harmful", "neutral", "stale"]


class ToolFailure(BaseModel):
    """The structured content of a failed call."""

    code: str
    detail: str
    status: int | None = None


def _passage(hit: Hit) -> Passage:
    return Passage(doc_id=hit.doc_id, block_id=hit.block_id, ordinal=hit.ordinal, score=hit.score, text=hit.text,
                   metadata=hit.metadata, agent=hit.agent)


def _ok(result: BaseModel) -> CallToolResult:
    data = result.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data))], structured_content=data)


def _failure(code: str, detail: str, status: int | None = None) -> CallToolResult:
    failure = ToolFailure(code=code, detail=detail, status=status)
    return CallToolResult(content=[TextContent(type="text", text=f"{code}: {detail}")],
                          structured_content=failure.model_dump(), is_error=True)


async def _guarded(run: Callable[[], Awaitable[BaseModel]]) -> CallToolResult:
    """Run a tool body; the SDK's errors become tool errors carrying the kvrag code instead of crashes."""
    try:
        return _ok(await run())
    except APIError as exc:
        return _failure(exc.code, exc.detail, exc.status)
    except APIConnectionError as exc:
        return _failure("unavailable", str(exc))
    except KVRagError as exc:
        return _failure("internal", str(exc))


async def get_context_map(kv: AsyncKVRag, bank: str) -> ContextMap:
    """The bank's map as the tool returns it (every item field the server sends kept)."""
    cmap = await kv.context_map.get(bank)
    return ContextMap(version=cmap.version, budget_tokens=cmap.budget_tokens, tokens=cmap.tokens,
                      items=[item.model_dump(mode="json") for item in cmap.items])


# -- the server ---------------------------------------------------------------------------------------


def new_doc_id() -> str:
    """An id for a memory stored without one."""
    return f"mem-{uuid.uuid4().hex[:20]}"


def build_server(connect: Connector, name: str = "kvrag") -> MCPServer:
    """An MCP server whose tools act on the memory ``connect`` opens for each call."""
    server = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=True, open_world_hint=False))
    async def remember(
        ctx: Context,
        text: Annotated[str, Field(min_length=1, description="What to remember.")],
        doc_id: Annotated[str | None, Field(description="Its id; storing again under an id replaces that "
                                                        "memory. Assigned (and returned) when omitted.")] = None,
        tags: Annotated[list[str] | None, Field(description="Tags to filter on later.")] = None,
        metadata: Annotated[dict[str, Any] | None, Field(description="Free-form JSON metadata.")] = None,
    ) -> Annotated[CallToolResult, Remembered]:
        """Store a text in shared memory (encoded once, recalled and answered from later)."""

        async def run() -> Remembered:
            async with connect(ctx) as mem:
                put = await mem.kv.documents.put(mem.bank, doc_id or new_doc_id(), text, metadata=metadata,
                                                 tags=tags)
            doc = put.document
            return Remembered(doc_id=doc.doc_id, version=doc.version, created=put.created, changed=put.changed,
                              tokens=doc.tokens)

        return await _guarded(run)

    @server.tool(annotations=read_only)
    async def recall(
        ctx: Context,
        query: Annotated[str, Field(min_length=1, description="What to look for.")],
        k: Annotated[int, Field(ge=1, le=100, description="Passages to return.")] = 5,
    ) -> Annotated[CallToolResult, Recalled]:
        """Find the stored passages most similar to a query, with their ids and scores."""

        async def run() -> Recalled:
            async with connect(ctx) as mem:
                hits = await mem.kv.search(mem.bank, query, k=k)
            return Recalled(passages=[_passage(h) for h in hits])

        return await _guarded(run)

    @server.tool(annotations=read_only)
    async def ask(
        ctx: Context,
        question: Annotated[str, Field(min_length=1, description="The question.")],
        k: Annotated[int, Field(ge=1, le=100, description="Passages to answer from.")] = 5,
        max_new_tokens: Annotated[int, Field(ge=0, le=1024, description="Answer length limit in tokens.")] = 128,
    ) -> Annotated[CallToolResult, Answer]:
        """Answer a question from memory (the server assembles the stored KV of the best passages)."""

        async def run() -> Answer:
            async with connect(ctx) as mem:
                result = await mem.kv.query(mem.bank, question, k=k, mode="kv", max_new_tokens=max_new_tokens)
            return Answer(answer=result.answer, sources=[_passage(h) for h in result.sources],
                          context_tokens=result.usage.context_tokens,
                          generated_tokens=result.usage.generated_tokens, ttft_ms=result.timings.ttft_ms)

        return await _guarded(run)

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    async def session_append(
        ctx: Context,
        session_id: Annotated[str, Field(min_length=1, max_length=128, description="The agent session (created on "
                                                                                   "first append).")],
        text: Annotated[str, Field(min_length=1, description="What happened: a tool output, a note, a reply.")],
        role: Annotated[Literal["orchestrator", "tool", "worker", "note"], Field(description="Who wrote it.")] = "note",
    ) -> Annotated[CallToolResult, SessionAppended]:
        """Append a step to an agent session kept as KV on the server (only the new tokens are encoded)."""

        async def run() -> SessionAppended:
            segment = [{"role": role, "text": text}]
            async with connect(ctx) as mem:
                try:
                    result = await mem.kv.sessions.append(mem.bank, session_id, segment)
                except NotFound:
                    await mem.kv.sessions.create(mem.bank, session_id)
                    result = await mem.kv.sessions.append(mem.bank, session_id, segment)
            return SessionAppended(session_id=session_id, segment_id=result.segment_ids[0],
                                   segment_tokens=result.token_counts[0], tokens=result.tokens)

        return await _guarded(run)

    @server.tool(annotations=read_only)
    async def session_brief(
        ctx: Context,
        session_id: Annotated[str, Field(min_length=1, max_length=128, description="The agent session.")],
        task: Annotated[str, Field(min_length=1, description="The worker's task or question.")],
        budget_tokens: Annotated[int | None, Field(ge=0, description="Keep at most this many session tokens "
                                                                     "(default: all).")] = None,
        max_new_tokens: Annotated[int, Field(ge=0, le=1024, description="Answer length limit in tokens.")] = 128,
    ) -> Annotated[CallToolResult, SessionBrief]:
        """Answer a task from an agent session, compacted to the parts the task attends to."""

        async def run() -> SessionBrief:
            async with connect(ctx) as mem:
                result = await mem.kv.sessions.brief(mem.bank, session_id, task, budget_tokens=budget_tokens,
                                                     max_new_tokens=max_new_tokens)
            return SessionBrief(answer=result.answer, kept_tokens=result.kept_tokens,
                                session_tokens=result.session_tokens, ttft_ms=result.timings.ttft_ms)

        return await _guarded(run)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    async def forget(
        ctx: Context,
        doc_id: Annotated[str, Field(min_length=1, description="The id `remember` returned.")],
    ) -> Annotated[CallToolResult, Forgotten]:
        """Delete a memory by id."""

        async def run() -> Forgotten:
            async with connect(ctx) as mem:
                await mem.kv.documents.delete(mem.bank, doc_id)
            return Forgotten(doc_id=doc_id, deleted=True)

        return await _guarded(run)

    @server.tool(annotations=read_only)
    async def context_map(ctx: Context) -> Annotated[CallToolResult, ContextMap]:
        """Read the bank's context map: a small, token-budgeted summary of what memory holds and what
        earlier work found (sections roadmap, understanding, reusable_results; items with stable ids)."""

        async def run() -> ContextMap:
            async with connect(ctx) as mem:
                return await get_context_map(mem.kv, mem.bank)

        return await _guarded(run)

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False))
    async def context_map_edit(
        ctx: Context,
        edits: Annotated[list[MapEdit], Field(description="Edits, applied in order.")],
        feedback: Annotated[list[MapFeedback] | None, Field(description="How useful items were.")] = None,
        base_version: Annotated[int | None, Field(description="The map version the edits are based on; items "
                                                               "changed since then refuse them.")] = None,
    ) -> Annotated[CallToolResult, ContextMap]:
        """Update the bank's context map (add, replace or delete items; rate items helpful or harmful)."""

        async def run() -> ContextMap:
            changes = [ContextMapEdit.model_validate(e.model_dump(exclude_none=True)) for e in edits]
            votes = [ContextMapFeedback.model_validate(f.model_dump()) for f in feedback or ()]
            async with connect(ctx) as mem:
                await mem.kv.context_map.edit(mem.bank, changes, feedback=votes, base_version=base_version)
                return await get_context_map(mem.kv, mem.bank)  # the map as it now stands, evictions included

        return await _guarded(run)

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=True, open_world_hint=False))
    async def context_map_pin(
        ctx: Context,
        item_id: Annotated[str, Field(min_length=1, max_length=16, description="The item, e.g. cu-3.")],
        pinned: Annotated[bool, Field(description="true pins the item, false unpins it.")] = True,
    ) -> Annotated[CallToolResult, ContextMap]:
        """Pin (or unpin) a context-map item: while pinned, no edit, refresh or eviction removes or replaces it.
        Needs an owner key."""

        async def run() -> ContextMap:
            async with connect(ctx) as mem:
                await (mem.kv.context_map.pin if pinned else mem.kv.context_map.unpin)(mem.bank, item_id)
                return await get_context_map(mem.kv, mem.bank)

        return await _guarded(run)

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=True, open_world_hint=False))
    async def session_restore(
        ctx: Context,
        session_id: Annotated[str, Field(min_length=1, max_length=128, description="The agent session.")],
        segments: Annotated[list[int] | None, Field(description="Pruned segment ids to bring back (default: every "
                                                                "one still restorable).")] = None,
    ) -> Annotated[CallToolResult, SessionRestored]:
        """Bring pruned segments of an agent session back into its live KV, exactly as they were."""

        async def run() -> SessionRestored:
            async with connect(ctx) as mem:
                result = await mem.kv.sessions.restore(mem.bank, session_id, segments)
            return SessionRestored(session_id=session_id, restored=result.restored, tokens=result.tokens,
                                   expired=result.expired)

        return await _guarded(run)

    return server


def stdio_connector(url: str | None, api_key: str | None, bank: str) -> Connector:
    """Every call goes to the kvrag server at ``url`` with one key and one bank (``kvrag mcp``)."""

    @asynccontextmanager
    async def connect(_ctx: Context) -> AsyncIterator[Memory]:
        async with AsyncKVRag(url, api_key=api_key) as kv:
            yield Memory(kv, bank)

    return connect


def run_stdio(bank: str, url: str | None = None, api_key: str | None = None) -> None:
    """Serve the tools over stdin/stdout until the client closes the stream."""
    build_server(stdio_connector(url, api_key, bank), name=f"kvrag:{bank}").run("stdio")
