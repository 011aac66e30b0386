"""End to end on the real packaged models (SmolLM2-135M GGUF, all-MiniLM-L6-v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.model.loader import Embedder, LoadedModel

PARAGRAPHS = {
    "normans": ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a "
                "region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and "
                "Norway who, under their leader Rollo, agreed to swear fealty to King Charles III of West Francia."),
    "paris": ("Paris is the capital and most populous city of France. Situated on the Seine River, in the north of "
              "the country, it is at the heart of the Ile-de-France region."),
    "photosynthesis": ("Photosynthesis is a process used by plants to convert light energy into chemical energy "
                       "that, through cellular respiration, can later be released to fuel the organism."),
}


@pytest.mark.slow
def test_packaged_models_answer_in_both_modes(tmp_path: Path, smollm2: LoadedModel, embedder: Embedder) -> None:
    store = BankStore(Settings(data_dir=tmp_path), llm=smollm2, embedder=embedder)
    store.create_bank("demo")
    for doc_id, text in PARAGRAPHS.items():
        store.put_document("demo", doc_id, text)
    for mode in ("kv", "text"):
        result = store.query("demo", "What is the capital of France?", k=2, mode=mode,  # type: ignore[arg-type]
                             max_new_tokens=16)
        assert result.answer.strip(), mode
        assert result.sources[0].doc_id == "paris"
        assert result.usage.generated_tokens > 0
    single_kv = store.query("demo", "Who were the Normans descended from?", k=1, max_new_tokens=12)
    single_text = store.query("demo", "Who were the Normans descended from?", k=1, mode="text", max_new_tokens=12)
    assert single_kv.answer == single_text.answer
    stats = store.stats("demo")
    # The auto default codec for the calibrated packaged model: tklt5, about 5x below fp16 (short
    # paragraphs carry more per-block ranges and tier sections than the benchmark's).
    assert store.get_bank("demo").codec == "tklt5"
    assert stats.documents == 3 and stats.compression_ratio > 4.0
    store.close()
