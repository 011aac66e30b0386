"""The facade the server, CLI and benchmarks use: banks, documents, search, query, stats.

:class:`BankStore` owns the process's shared resources (catalog sessions, blob store, KV memory budget,
model, locks) and wires the parts that do the work, each given only the collaborators it needs:

- :class:`kvstore.storage.indexes.BankIndexes`: every bank's FAISS index (snapshot + op-log replay);
- :class:`kvstore.banks.service.Banks`: bank rows, settings, deletion and stats;
- :class:`kvstore.banks.documents.DocumentReader` and :class:`kvstore.ingest.writer.DocumentWriter`:
  reading, putting and deleting documents;
- :class:`kvstore.query.retrieval.Retriever`: search;
- :class:`kvstore.memory.blocks.BlockLoader`: a block's KV, with quarantine and rebuild of damaged blocks;
- :class:`kvstore.query.service.QueryService`: plan, answer, then the writes that follow an answer;
- the memory manager, context maps, key summaries and agent sessions, which take the store itself
  (typed as :class:`kvstore.ports.Engine`).

Every public method below is one of those parts' methods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from sqlalchemy.orm import Session, sessionmaker

from kvstore.banks.documents import DocumentReader
from kvstore.banks.service import Banks
from kvstore.config import Settings
from kvstore.contextmap.service import ContextMaps
from kvstore.ingest.encoder import BlockEncoder
from kvstore.ingest.writer import DocumentWriter
from kvstore.memory.blocks import BlockLoader
from kvstore.memory.budget import KVBudget
from kvstore.memory.hot import HotCache
from kvstore.memory.tiers import MemoryManager
from kvstore.model.attention_bias import measured_block_bias
from kvstore.model.batching import QuestionBatcher
from kvstore.model.host_memory import keep_freed_memory, prime
from kvstore.model.limits import PromptLimits
from kvstore.model.loader import Embedder, LoadedModel, load_llm
from kvstore.model.runner import Runner, set_threads
from kvstore.query.history import QueryHistory
from kvstore.query.keysummary import KeySummaries
from kvstore.query.plan import QueryPlanner
from kvstore.query.retrieval import Retriever
from kvstore.query.service import QueryService
from kvstore.query.strategies import Model
from kvstore.sessions.service import SessionStore
from kvstore.storage import lock as data_dir_lock
from kvstore.storage.blobgc import BlobCollector
from kvstore.storage.blobstore import BlobStore, open_blob_store
from kvstore.storage.catalog import OpLogRow, open_catalog
from kvstore.storage.indexes import BankIndexes
from kvstore.storage.integrity import IntegrityLog
from kvstore.storage.replication import Replication, open_replication

WaitHook = Callable[[], AbstractContextManager[object]]


class BankStore:
    """All banks of one kvrag process: catalog, blobs, FAISS indexes, hot tier and the model.

    ``while_waiting`` is entered while a question waits for its batch (:class:`QuestionBatcher`): the server
    passes its worker's ``released`` so other requests proceed meanwhile."""

    def __init__(self, settings: Settings | None = None, *, llm: LoadedModel | None = None,
                 embedder: Embedder | None = None, migrate: bool = True,
                 while_waiting: WaitHook = nullcontext) -> None:
        self.settings = settings or Settings()
        # One process per data dir (kvstore.storage.lock): refused before anything is opened or migrated.
        self._dir_lock = data_dir_lock.acquire(self.settings.data_dir)
        self._catalog_lock: data_dir_lock.DataDirLock | None = None
        try:
            self._catalog_lock = data_dir_lock.acquire_sqlite_catalog(self.settings.resolved_database_url())
            self._open(llm, embedder, migrate, while_waiting)
        except BaseException:  # a refused or failed start leaves the data dir (and catalog) free
            if self._catalog_lock is not None:
                self._catalog_lock.release()
            self._dir_lock.release()
            raise

    def _open(self, llm: LoadedModel | None, embedder: Embedder | None, migrate: bool,
              while_waiting: WaitHook) -> None:
        settings = self.settings
        set_threads(settings.torch_threads)
        keep_freed_memory()  # before anything large is allocated, so every allocation follows the thresholds
        self.sessions: sessionmaker[Session] = open_catalog(settings.resolved_database_url(), migrate=migrate,
                                                              settings=settings)
        self.blobs: BlobStore = open_blob_store(settings.blob_url, settings.data_dir / "blobs",
                                                cache_bytes=settings.blob_cache_bytes,
                                                allow_http=settings.blob_allow_http)
        # Every KV kept in memory (hot tier, context-map KV, session states) shares one budget, per bank.
        self.kv_memory = KVBudget(settings.kv_memory_bytes, bank_bytes=settings.kv_memory_bank_bytes)
        self.hot = HotCache(settings.hot_tier_bytes, kv=self.kv_memory)
        self.embedder = embedder or Embedder(settings)
        self.llm = llm or load_llm(settings)
        bias = settings.block_bias
        self.runner = Runner(self.llm, settings.system_prompt, settings.device_cache_bytes,
                             measured_block_bias(self.llm.name) if bias is None else bias)
        if settings.prime_blocks:
            prime(self.runner, settings.prime_blocks, settings.block_tokens)
        self.limits = PromptLimits(settings, self.runner, self.llm)
        self.model_lock = threading.Lock()
        self.blob_lock = threading.Lock()  # around blob writes/deletes and the catalog commit referencing them
        self.agent_sessions = SessionStore(self)
        self.memory = MemoryManager(self, self.agent_sessions)
        self.context_map = ContextMaps(self)
        self.batcher = QuestionBatcher(self.runner, self.model_lock, settings.batch_max_size, while_waiting)
        self.summaries = KeySummaries(self)
        if self.llm.device.type == "cuda":
            self.hot.pin_dtype = self.llm.dtype
        self.integrity = IntegrityLog()
        # On PostgreSQL: join the replicas (refused on another model or blob store) before loading the indexes, so
        # the follower's watermark never passes an op the loaded indexes lack.
        self.replication: Replication | None = open_replication(self.sessions, settings, self.llm, self.apply_ops)
        self.indexes = BankIndexes(self.sessions, settings.data_dir / "indexes", self.embedder.dim,
                                   self.integrity.note, self.replication.follower if self.replication else None)
        self._wire()
        self.indexes.load_all()
        if self.replication is not None:
            self.replication.start()

    def _wire(self) -> None:
        """Build the parts over the shared resources, and expose their methods as the store's API."""
        settings, sessions, model_lock, blob_lock = self.settings, self.sessions, self.model_lock, self.blob_lock
        self.gc = BlobCollector(self.blobs, self.hot)
        self.banks = Banks(settings, sessions, self.llm, self.runner, self.indexes, self.context_map, self.memory,
                           self.hot, self.kv_memory, blob_lock, self.gc,
                           self.agent_sessions.deleting_bank)
        self.documents = DocumentReader(sessions, self.banks, self.hot, self.memory.config)
        encoder = BlockEncoder(self.runner, self.embedder, model_lock, self.blobs, self.summaries,
                               settings.encode_batch_size)
        self.writer = DocumentWriter(settings, sessions, self.banks, self.llm, encoder, blob_lock, self.indexes,
                                     self.gc, self.memory, self.context_map, self.hot)
        self.retriever = Retriever(settings, sessions, self.banks, self.embedder, self.indexes, self.summaries)
        self.blocks = BlockLoader(sessions, self.banks, self.llm, self.runner, model_lock, self.blobs, blob_lock,
                                  self.hot, self.memory, self.summaries, self.gc, self.integrity.note)
        planner = QueryPlanner(sessions, self.banks, self.llm, self.runner, self.retriever, self.context_map,
                               self.limits, self.batcher.enabled)
        self.queries = QueryService(settings, self.llm, sessions, planner, self.blocks,
                                    Model(self.runner, model_lock, self.batcher, self.memory), self.memory,
                                    self.context_map)
        self.history = QueryHistory(settings, sessions, self.banks)
        # -- the API (one part's method each) --
        self.note = self.integrity.note
        self.integrity_report = self.integrity.report
        self.bank_row = self.banks.row
        self.bank_index = self.indexes.get
        self.load_indexes = self.indexes.load_all
        self.create_bank = self.banks.create
        self.list_banks = self.banks.list_banks
        self.get_bank = self.banks.get
        self.update_bank = self.banks.update
        self.delete_bank = self.banks.delete
        self.stats = self.banks.stats
        self.put_document = self.writer.put
        self.delete_document = self.writer.delete
        self.drop_unreferenced = self.gc.drop_unreferenced
        self.get_document = self.documents.get
        self.list_documents = self.documents.list_documents
        self.list_blocks = self.documents.list_blocks
        self.search = self.retriever.search
        self.load_block = self.blocks.load
        self.verify = self.blocks.verify
        self.query = self.queries.query
        self.log_query = self.history.log_query
        self.recent_queries = self.history.recent_queries
        self.maintain = self.memory.maintain

    def apply_ops(self, s: Session, ops: Sequence[OpLogRow]) -> None:
        """Another replica's writes, from the op-log follower, applied to the loaded indexes."""
        self.indexes.apply_ops(s, ops)

    def close(self) -> None:
        """Snapshot every index so the next start replays nothing; leave the replicas; free the data dir."""
        if self.replication is not None:
            self.replication.stop()
        self.indexes.snapshot_all()
        if self.replication is not None:
            self.replication.registry.unregister()
        self.sessions.kw["bind"].dispose()
        if self._catalog_lock is not None:
            self._catalog_lock.release()
        self._dir_lock.release()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A catalog session for callers that need one (benchmarks, maintenance)."""
        with self.sessions() as s:
            yield s


__all__ = ["BankStore", "WaitHook"]


