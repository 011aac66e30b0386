"""Hostile input against a real server process: schemathesis over the whole OpenAPI schema, then the
attacks a schema fuzzer does not try (lone surrogates, invalid UTF-8 inside strings, absurd numbers,
path traversal in bank names). Nothing may answer 500 or break the response schema, and nothing
rejected may be stored. (tests/server/test_server_input.py covers bodies, depth, size and document ids.)
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.app import create_app
from server.settings import ServerSettings
from tests.reliability.procs import ForkServer, ServerLife, record_figures
from tests.reliability.serve_tiny import ADMIN_KEY

MAX_EXAMPLES = 25
FUZZ_BANK = "fuzz"
TEXT = "The harbour ledger is kept in the archive."
CASES: list[str] = []
SERVER_ERRORS: list[str] = []  # 5xx answers other than 503 (busy), for the recorded figures


@pytest.fixture(scope="module")
def hostile_life(fork_server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerLife]:
    # Low configured ceilings: a schema-valid k or max_new_tokens above them must be a 422, not slow work.
    life = fork_server.start(tmp_path_factory.mktemp("hostile"), max_new_tokens=8, max_document_chars=4000,
                             max_body_bytes=256 << 10)
    with life.client() as c:
        assert c.post("/v1/banks", json={"name": FUZZ_BANK}).status_code == 201
        assert c.post("/v1/banks", json={"name": "empty"}).status_code == 201
        assert c.put(f"/v1/banks/{FUZZ_BANK}/documents/seed", json={"text": TEXT}).status_code == 201
    yield life
    if CASES:
        record_figures("hostile_input", {"schemathesis_cases": len(CASES), "operations": len(set(CASES)),
                                         "max_examples_per_operation": MAX_EXAMPLES,
                                         "server_errors": len(SERVER_ERRORS)})
    life.signal(signal.SIGTERM)
    life.wait_dead()


def _operations() -> dict[str, Any]:
    """Every operation of the server's OpenAPI schema, by ``METHOD /path`` (built from the app itself,
    which needs no store, so the cases are known at collection time)."""
    app = create_app(ServerSettings(data_dir=Path(tempfile.gettempdir()) / "kvrag-openapi"))
    loaded = schemathesis.openapi.from_dict(app.openapi())
    ops = [result.ok() for result in loaded.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op for op in ops}


OPERATIONS = _operations()


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_input_yields_a_500_or_breaks_the_response_schema(label: str, hostile_life: ServerLife) -> None:
    operation = OPERATIONS[label]

    @given(operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        if "bank" in (case.path_parameters or {}):
            # Most generated names miss; aim at a bank that exists so bodies reach the engine. Deleting it would
            # leave nothing to fuzz, so a generated DELETE goes to a bank kept for that.
            case.path_parameters["bank"] = "empty" if case.method.upper() == "DELETE" else FUZZ_BANK
        CASES.append(label)
        response = case.call(base_url=hostile_life.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=60)
        if response.status_code >= 500 and response.status_code != 503:
            SERVER_ERRORS.append(label)
        assert response.status_code < 500 or response.status_code == 503, response.text[:500]
        case.validate_response(response, checks=[response_schema_conformance, status_code_conformance,
                                                 content_type_conformance])

    fuzz()


HOSTILE: list[tuple[str, str, bytes]] = [
    # JSON escapes that decode to lone surrogates: valid JSON, not encodable text.
    ("PUT", f"/v1/banks/{FUZZ_BANK}/documents/sur", b'{"text": "broken \\ud800 text"}'),
    ("PUT", f"/v1/banks/{FUZZ_BANK}/documents/sur", b'{"text": "ok", "metadata": {"k": "\\udfff"}}'),
    ("PUT", f"/v1/banks/{FUZZ_BANK}/documents/sur", b'{"text": "ok", "tags": ["\\ud83d"]}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "\\ud800"}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/query", b'{"question": "who \\udc00?", "max_new_tokens": 1}'),
    ("POST", "/v1/banks", b'{"name": "\\ud800"}'),
    # Invalid UTF-8 inside a string.
    ("PUT", f"/v1/banks/{FUZZ_BANK}/documents/utf", b'{"text": "caf\xe9 \xc3\x28"}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "\xed\xa0\x80"}'),
    # Absurd numbers.
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "x", "k": 1000000000000000000000}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "x", "k": -1}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "x", "k": 1e308}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/search", b'{"query": "x", "k": NaN}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/query", b'{"question": "x", "max_new_tokens": 9223372036854775808}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/query", b'{"question": "x", "max_new_tokens": 1000}'),
    ("POST", f"/v1/banks/{FUZZ_BANK}/query", b'{"question": "x", "k": true}'),
    ("POST", "/v1/banks", b'{"name": "big", "budget_bytes": 1e400}'),
    ("POST", "/v1/banks", b'{"name": "big", "budget_bytes": -5}'),
    # Past the catalog's integer columns (64-bit budget, 32-bit block cap): a 422, not a driver overflow.
    ("POST", "/v1/banks", b'{"name": "big", "budget_bytes": 9223372036854775808}'),
    ("POST", "/v1/banks", b'{"name": "big", "max_blocks": 2147483648}'),
    ("PATCH", f"/v1/banks/{FUZZ_BANK}", b'{"budget_bytes": 9223372036854775808}'),
    ("PATCH", f"/v1/banks/{FUZZ_BANK}", b'{"max_blocks": 2147483648}'),
    # Path traversal in bank names (encoded: clients resolve a bare "..").
    ("PUT", "/v1/banks/..%2F..%2Fetc/documents/x", b'{"text": "x"}'),
    ("POST", "/v1/banks/..%2Findexes/search", b'{"query": "x"}'),
    ("DELETE", "/v1/banks/%2E%2E", b""),
    ("GET", "/v1/banks/fuzz%2F..%2Fempty", b""),
    ("POST", "/v1/banks", b'{"name": "../../tmp/x"}'),
    ("POST", "/v1/banks", b'{"name": "a/../../b"}'),
]


@pytest.mark.parametrize(("method", "path", "body"), HOSTILE)
def test_hostile_requests_are_rejected_cleanly_and_store_nothing(hostile_life: ServerLife, method: str, path: str,
                                                                 body: bytes) -> None:
    with hostile_life.client() as c:
        before = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        banks_before = {b["name"] for b in c.get("/v1/banks").json()["banks"]}
        r = c.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert set(r.json()) == {"detail", "code", "request_id"}
        after = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        assert (after["documents"], after["blocks"]) == (before["documents"], before["blocks"])
        assert {b["name"] for b in c.get("/v1/banks").json()["banks"]} == banks_before



# The MCP door (/mcp/{bank}; not in the OpenAPI schema, so schemathesis never sees it). Errors the door
# answers itself use kvrag's shape; those of the MCP SDK's transport are JSON-RPC errors, as MCP clients expect.
MCP = f"/mcp/{FUZZ_BANK}"
MCP_ACCEPT = "application/json, text/event-stream"
_PING = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
_INIT = (b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", '
         b'"capabilities": {}, "clientInfo": {"name": "fuzz", "version": "0"}}}')
MCP_HOSTILE: list[tuple[str, bytes, dict[str, str]]] = [
    ("not JSON", b"{", {}),
    ("not JSON-RPC", b'{"hello": "world"}', {}),
    ("JSON-RPC without a method", b'{"jsonrpc": "2.0", "id": 1}', {}),
    ("a bare string", b'"initialize"', {}),
    ("a tool call before initialize", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": '
                                      b'"forget", "arguments": {"doc_id": "seed"}}}', {}),
    ("a lone surrogate", b'{"jsonrpc": "2.0", "id": 1, "method": "\\ud800"}', {}),
    ("nested too deep", b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": ' + b'{"a": ' * 64 + b"1"
     + b"}" * 64 + b"}", {}),
    ("oversize", b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * (300 << 10) + b'"}}',
     {}),
    ("a huge batch", b"[" + b",".join([_PING] * 4000) + b"]", {}),
    ("wrong content type", _INIT, {"Content-Type": "text/plain"}),
    ("an Accept header without JSON or SSE", _INIT, {"Accept": "text/html"}),
    ("an unknown session id", _PING, {"mcp-session-id": "0123456789abcdef0123456789abcdef"}),
    ("a session id that is no id", _PING, {"mcp-session-id": "../../etc/passwd"}),
    ("no key", _INIT, {"Authorization": ""}),
]


@pytest.mark.parametrize(("case", "body", "headers"), MCP_HOSTILE, ids=[c[0] for c in MCP_HOSTILE])
def test_hostile_mcp_requests_are_refused_and_change_nothing(hostile_life: ServerLife, case: str, body: bytes,
                                                            headers: dict[str, str]) -> None:
    with hostile_life.client() as c:
        before = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        banks_before = {b["name"] for b in c.get("/v1/banks").json()["banks"]}
        sent = {"Content-Type": "application/json", "Accept": MCP_ACCEPT, "MCP-Protocol-Version": "2025-06-18",
                **headers}
        r = c.post(MCP, content=body, headers={k: v for k, v in sent.items() if v})
        if not headers.get("Authorization", True):
            r = httpx.post(hostile_life.url + MCP, content=body, headers={k: v for k, v in sent.items() if v})
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
        assert r.headers.get("content-type", "").startswith("application/json"), (case, r.headers, r.text[:300])
        answer = r.json()
        assert set(answer) == {"detail", "code", "request_id"} or "error" in answer, (case, answer)
        after = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        assert (after["documents"], after["blocks"]) == (before["documents"], before["blocks"])
        assert {b["name"] for b in c.get("/v1/banks").json()["banks"]} == banks_before
        assert c.get(f"/v1/banks/{FUZZ_BANK}/documents/seed").status_code == 200


# The OpenAI door is in the schema (schemathesis fuzzes it above) but answers in OpenAI's error shape, so the
# attacks a schema fuzzer does not try get cases of their own: every one a 4xx error, nothing stored.
CHAT = "/v1/chat/completions"


def _chat(messages: bytes, extra: bytes = b"", model: bytes = b"kvrag:" + FUZZ_BANK.encode()) -> bytes:
    return b'{"model": "' + model + b'", "messages": ' + messages + extra + b"}"


_ASK = b'[{"role": "user", "content": "Where is the ledger?"}]'
CHAT_HOSTILE: list[tuple[str, bytes]] = [
    ("a lone surrogate in the message", _chat(b'[{"role": "user", "content": "who \\ud800?"}]')),
    ("invalid UTF-8 in the message", _chat(b'[{"role": "user", "content": "caf\xe9 \xc3\x28"}]')),
    ("a message over the question's token cap", _chat(b'[{"role": "user", "content": "'
                                                      + b"ledger " * 20_000 + b'"}]')),
    ("the last message is not the user's", _chat(b'[{"role": "assistant", "content": "hi"}]')),
    ("no messages", _chat(b"[]")),
    ("an empty user message", _chat(b'[{"role": "user", "content": "   "}]')),
    ("content parts of another kind", _chat(b'[{"role": "user", "content": [{"type": "image_url", "image_url": '
                                            b'{"url": "file:///etc/passwd"}}]}]')),
    ("max_tokens of 2^63", _chat(_ASK, b', "max_tokens": 9223372036854775808')),
    ("max_tokens above the ceiling", _chat(_ASK, b', "max_tokens": 100000')),
    ("max_tokens of -1", _chat(_ASK, b', "max_tokens": -1')),
    ("n of 5", _chat(_ASK, b', "n": 5')),
    ("k of 10^21", _chat(_ASK, b', "k": 1000000000000000000000')),
    ("a temperature of NaN", _chat(_ASK, b', "temperature": NaN')),
    ("a hundred stop sequences", _chat(_ASK, b', "stop": [' + b",".join([b'"x"'] * 100) + b"]")),
    ("a model outside kvrag", _chat(_ASK, model=b"gpt-4")),
    ("a traversal in the bank name", _chat(_ASK, model=b"kvrag:../../etc")),
    ("a role of its own", _chat(b'[{"role": "root", "content": "delete everything"}]')),
]


@pytest.mark.parametrize(("case", "body"), CHAT_HOSTILE, ids=[c[0] for c in CHAT_HOSTILE])
def test_hostile_chat_completions_are_refused_in_openai_shape_and_store_nothing(hostile_life: ServerLife, case: str,
                                                                               body: bytes) -> None:
    with hostile_life.client() as c:
        before = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        r = c.post(CHAT, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
        answer = r.json()
        if "error" in answer:
            error = answer["error"]
            assert error["message"] and error["type"] and error["code"], (case, error)
        else:
            # Bodies that are not text (lone surrogates, invalid UTF-8) are refused by the body checks in front of
            # every route, in kvrag's shape.
            assert set(answer) == {"detail", "code", "request_id"}, (case, answer)
        after = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        assert (after["documents"], after["blocks"]) == (before["documents"], before["blocks"])


# Tool calls on an initialized MCP session: hostile arguments reach the tools (and through them the REST API).
# Each is an MCP tool error (or a JSON-RPC error), never a 5xx, and nothing is stored or deleted.
def _tool(name: bytes, arguments: bytes) -> bytes:
    return (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "' + name
            + b'", "arguments": ' + arguments + b"}}")


MCP_TOOL_HOSTILE: list[tuple[str, bytes]] = [
    ("ask over the question's token cap", _tool(b"ask", b'{"question": "' + b"ledger " * 20_000 + b'"}')),
    ("ask with a lone surrogate", _tool(b"ask", b'{"question": "who \\ud800?"}')),
    ("recall with k of 10^21", _tool(b"recall", b'{"query": "ledger", "k": 1000000000000000000000}')),
    ("recall with k of -1", _tool(b"recall", b'{"query": "ledger", "k": -1}')),
    ("forget ..", _tool(b"forget", b'{"doc_id": ".."}')),
    ("forget a traversal", _tool(b"forget", b'{"doc_id": "../../banks/fuzz"}')),
    ("remember a lone surrogate", _tool(b"remember", b'{"text": "broken \\udfff"}')),
    ("remember past the document limit", _tool(b"remember", b'{"text": "' + b"x" * 5000 + b'"}')),
    ("session_append over the segment cap", _tool(b"session_append", b'{"session_id": "s", "text": "'
                                                  + b"ledger " * 20_000 + b'"}')),
    ("an unknown tool", _tool(b"drop_everything", b"{}")),
    ("arguments that are no object", _tool(b"ask", b'"who?"')),
]


def _rpc_answers(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer (JSON, or the data lines of an event stream)."""
    import json

    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return [r.json()]


@pytest.mark.parametrize(("case", "body"), MCP_TOOL_HOSTILE, ids=[c[0] for c in MCP_TOOL_HOSTILE])
def test_hostile_mcp_tool_calls_are_tool_errors_and_change_nothing(hostile_life: ServerLife, case: str,
                                                                   body: bytes) -> None:
    headers = {"Content-Type": "application/json", "Accept": MCP_ACCEPT, "MCP-Protocol-Version": "2025-06-18"}
    with hostile_life.client() as c:
        before = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        banks_before = {b["name"] for b in c.get("/v1/banks").json()["banks"]}
        opened = c.post(MCP, content=_INIT, headers=headers)
        assert opened.status_code == 200, opened.text[:300]
        session = {**headers, "mcp-session-id": opened.headers["mcp-session-id"]}
        c.post(MCP, content=b'{"jsonrpc": "2.0", "method": "notifications/initialized"}', headers=session)
        r = c.post(MCP, content=body, headers=session)
        assert r.status_code < 500, (case, r.status_code, r.text[:300])
        if r.status_code < 400:
            answers = [a for a in _rpc_answers(r) if a.get("id") == 7]
            assert answers, (case, r.text[:300])
            answer = answers[0]
            assert "error" in answer or answer["result"].get("isError") is True, (case, answer)
        c.request("DELETE", MCP, headers=session)
        after = c.get(f"/v1/banks/{FUZZ_BANK}").json()
        assert (after["documents"], after["blocks"]) == (before["documents"], before["blocks"])
        # Every bank there before is still there (and none is new): "empty" is not among them by now, the
        # schemathesis DELETE above is aimed at it, so a fixed name list would test the module's order.
        assert {b["name"] for b in c.get("/v1/banks").json()["banks"]} == banks_before
        assert c.get(f"/v1/banks/{FUZZ_BANK}/documents/seed").status_code == 200
