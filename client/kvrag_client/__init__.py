"""kvrag-client: the Python SDK of the kvrag memory database (httpx + pydantic; never imports torch).

    from kvrag_client import KVRag

    with KVRag("http://127.0.0.1:8000", api_key="...") as kv:
        kv.banks.create("notes")
        kv.documents.put("notes", "paris", "Paris is the capital of France.")
        print(kv.query("notes", "What is the capital of France?").answer)
"""

from ._async_client import AsyncKVRag, AsyncQueryStream
from ._async_resources import AsyncJobHandle
from ._base import RawResponse
from ._client import KVRag, QueryStream
from ._exceptions import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequest,
    Conflict,
    CorruptBlock,
    IncompatibleModel,
    InternalServerError,
    InvalidId,
    JobCancelled,
    JobFailed,
    KVRagError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    Unavailable,
    ValidationError,
    VersionMismatch,
)
from ._resources import JobHandle
from ._sessions import (
    AppendResult,
    BriefResult,
    BriefTimings,
    PruneResult,
    RestoreResult,
    Segment,
    SegmentInput,
    Session,
)
from ._version import __version__
from .types import (
    ApiKey,
    Bank,
    BankOptions,
    ContextMap,
    ContextMapEdit,
    ContextMapEditResult,
    ContextMapFeedback,
    ContextMapItem,
    ContextMapRefresh,
    Document,
    DocumentInput,
    DoneEvent,
    Eviction,
    Health,
    Hit,
    Job,
    KeyRole,
    MaintenanceReport,
    Mode,
    PutResult,
    QueryKnobs,
    QueryResult,
    Retrieval,
    SearchFilter,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
)

__all__ = [
    "__version__", "KVRag", "AsyncKVRag", "QueryStream", "AsyncQueryStream", "JobHandle", "AsyncJobHandle",
    "RawResponse", "KVRagError", "APIError",
    "APIConnectionError", "APITimeoutError", "BadRequest", "AuthenticationError", "PermissionDenied", "NotFound",
    "Conflict", "VersionMismatch", "IncompatibleModel", "PayloadTooLarge", "ValidationError", "InvalidId",
    "RateLimited", "InternalServerError", "CorruptBlock", "Unavailable", "JobFailed", "JobCancelled", "ApiKey", "Bank",
    "BankOptions", "Eviction", "KeyRole", "Mode", "Document", "DocumentInput", "Health", "Hit", "Job",
    "MaintenanceReport", "PutResult", "QueryResult", "QueryKnobs", "Retrieval", "SearchFilter", "StreamEvent",
    "Timings", "TokenEvent", "DoneEvent", "Usage", "ContextMap", "ContextMapItem", "ContextMapEdit",
    "ContextMapFeedback", "ContextMapEditResult", "ContextMapRefresh", "Session", "Segment", "SegmentInput",
    "AppendResult", "BriefResult", "BriefTimings", "PruneResult", "RestoreResult",
]
