"""How the installed transformers takes a KV cache, so every forward kvrag runs passes it the asked-for way.

transformers renamed the models' ``past_key_values`` keyword to ``cache`` (the old name warns on every call and
goes away in 5.40); the GPU machine's release (5.17) still takes ``past_key_values`` only. The keyword is read
once per module class from its forward's own signature (``inspect`` follows the deprecation wrapper to the
function it wraps), so a model that takes either name gets the one it declares.
"""

from __future__ import annotations

import inspect
from typing import Any

NEW, OLD = "cache", "past_key_values"

_KEYWORDS: dict[type, str] = {}  # per module class: read once, a forward's signature does not change


def cache_keyword(module: object) -> str:
    """The keyword ``module``'s forward takes its KV cache by: ``cache`` where declared, else ``past_key_values``."""
    cls = type(module)
    keyword = _KEYWORDS.get(cls)
    if keyword is None:
        params = inspect.signature(getattr(cls, "forward", None) or cls.__call__).parameters
        keyword = _KEYWORDS[cls] = NEW if NEW in params else OLD
    return keyword


def with_cache(module: object, cache_obj: Any) -> dict[str, Any]:
    """The forward keyword argument that hands ``cache_obj`` (a transformers ``Cache``) to ``module``."""
    return {cache_keyword(module): cache_obj}
