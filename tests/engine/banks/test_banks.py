"""Bank names and document ids: what becomes a path segment, a URL part or a catalog key is checked first."""

from __future__ import annotations

import pytest

from kvstore.banks.documents import validate_doc_id
from kvstore.banks.service import validate_bank_name
from kvstore.errors import ValidationFailed


@pytest.mark.parametrize("name", ["kb", "a", "team-1_notes", "0" * 63])
def test_bank_names_that_pass(name: str) -> None:
    validate_bank_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "KB", "-kb", "_kb", "a/b", "a b", "0" * 64, "kb\n", "é", None, 3])
def test_bank_names_that_are_refused(name: object) -> None:
    with pytest.raises(ValidationFailed):
        validate_bank_name(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("doc_id", ["d1", "A.b:c-d_e", "x" * 128, "0"])
def test_document_ids_that_pass(doc_id: str) -> None:
    validate_doc_id(doc_id)


@pytest.mark.parametrize("doc_id", ["", ".", "..", ".hidden", "a/b", "a\\b", "a b", "x" * 129, "%2e%2e", "d\n",
                                    None, 7])
def test_document_ids_that_are_refused(doc_id: object) -> None:
    with pytest.raises(ValidationFailed):
        validate_doc_id(doc_id)  # type: ignore[arg-type]
