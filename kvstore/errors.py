"""Domain exceptions. Each carries a stable ``code``; the server maps codes to HTTP in one place."""

from __future__ import annotations


class KVRagError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(KVRagError):
    code = "bad_request"


class ValidationFailed(KVRagError):
    code = "validation_error"


class NotFound(KVRagError):
    code = "not_found"


class Conflict(KVRagError):
    code = "conflict"


class VersionMismatch(Conflict):
    code = "version_mismatch"


class PayloadTooLarge(KVRagError):
    code = "payload_too_large"


class IncompatibleModel(KVRagError):
    """KV produced by another model (fingerprint mismatch): refused, never mixed."""

    code = "incompatible_model"


class CorruptBlock(KVRagError):
    """A stored block failed its checksum or could not be parsed."""

    code = "corrupt_block"


class Unauthorized(KVRagError):
    code = "unauthorized"


class Forbidden(KVRagError):
    code = "forbidden"


class RateLimited(KVRagError):
    code = "rate_limited"


class Unavailable(KVRagError):
    code = "unavailable"


class CatalogLocked(Unavailable):
    """Startup migrations could not take the catalog locks they need within their time budget."""


class StorageUnavailable(Unavailable):
    """The blob store cannot be used: the object store is unreachable, refuses the credentials or lacks the bucket."""
