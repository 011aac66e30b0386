"""Reading documents and their blocks: one document with its text, pages of documents and of blocks."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from kvstore.errors import NotFound, ValidationFailed
from kvstore.memory.hot import HotCache
from kvstore.memory.placement import BlockInfo, block_page
from kvstore.memory.policy import MemoryConfig
from kvstore.ports import BankLookup
from kvstore.storage.catalog import BankRow, BlockRow, DocumentRow
from kvstore.types import DocumentInfo

DOC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def validate_doc_id(doc_id: str) -> None:
    if not isinstance(doc_id, str) or not DOC_ID.fullmatch(doc_id):
        raise ValidationFailed("document id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def find_document(s: Session, bank: BankRow, doc_id: str, required: bool = True) -> DocumentRow | None:
    """The document's row; None when absent and not ``required`` (else :class:`NotFound`)."""
    row = s.scalar(select(DocumentRow).where(DocumentRow.bank_id == bank.id, DocumentRow.doc_id == doc_id))
    if row is None and required:
        raise NotFound(f"document {doc_id!r} not found in bank {bank.name!r}")
    return row


def block_count(s: Session, document_id: int) -> int:
    return int(s.scalar(select(func.count()).select_from(BlockRow).where(BlockRow.document_id == document_id)) or 0)


def doc_info(row: DocumentRow, blocks: int, with_text: bool = False) -> DocumentInfo:
    return DocumentInfo(doc_id=row.doc_id, version=row.version, metadata=dict(row.meta or {}),
                        tags=list(row.tags or []), agent=row.agent, pinned=row.pinned, blocks=blocks,
                        tokens=row.tokens, content_hash=row.content_hash, created_at=row.created_at,
                        updated_at=row.updated_at, text=row.text if with_text else None)


def check_limit(limit: int) -> None:
    if limit < 1 or limit > 1000:
        raise ValidationFailed("limit must be between 1 and 1000")


class DocumentReader:
    """Read-only views of a bank's documents and blocks (``hot`` and ``config`` tell each block's tier)."""

    def __init__(self, sessions: sessionmaker[Session], banks: BankLookup, hot: HotCache,
                 config: MemoryConfig) -> None:
        self.sessions = sessions
        self.banks = banks
        self.hot = hot
        self.config = config

    def get(self, bank: str, doc_id: str) -> DocumentInfo:
        with self.sessions() as s:
            row = find_document(s, self.banks.row(s, bank), doc_id)
            assert row is not None
            return doc_info(row, block_count(s, row.id), with_text=True)

    def list_documents(self, bank: str, *, cursor: str | None = None, limit: int = 100
                       ) -> tuple[list[DocumentInfo], str | None]:
        """Documents ordered by id; ``cursor`` is the last doc id of the previous page."""
        check_limit(limit)
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            q = select(DocumentRow).where(DocumentRow.bank_id == bank_row.id)
            if cursor:
                q = q.where(DocumentRow.doc_id > cursor)
            rows = s.scalars(q.order_by(DocumentRow.doc_id).limit(limit + 1)).all()
            counts = dict(s.execute(select(BlockRow.document_id, func.count()).where(
                BlockRow.document_id.in_([r.id for r in rows])).group_by(BlockRow.document_id)).tuples().all())
            page = [doc_info(r, int(counts.get(r.id, 0))) for r in rows[:limit]]
            return page, (rows[limit - 1].doc_id if len(rows) > limit else None)

    def list_blocks(self, bank: str, *, cursor: int | None = None, limit: int = 100, doc_id: str | None = None
                    ) -> tuple[list[BlockInfo], int | None]:
        """A bank's blocks (or one document's) in id order with tier, codec, stored bytes and heat;
        ``cursor`` is the last block id of the previous page."""
        check_limit(limit)
        with self.sessions() as s:
            bank_row = self.banks.row(s, bank)
            doc = find_document(s, bank_row, doc_id) if doc_id is not None else None
            return block_page(s, bank_row, self.hot, self.config, cursor=cursor, limit=limit,
                              document_pk=doc.id if doc is not None else None)
