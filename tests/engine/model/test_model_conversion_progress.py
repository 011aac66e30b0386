"""The first start converts the packaged model (~35 s): the log shows its progress in percent, phase by phase."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from kvstore.config import Settings
from kvstore.model.loader import load_llm


@pytest.mark.slow
def test_the_packaged_model_conversion_logs_its_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvstore.model.loader")
    llm = load_llm(Settings(data_dir=tmp_path, model_cache_dir=tmp_path / "models"))
    assert llm.name == "SmolLM2-135M-Instruct"
    percents = [int(m.group(1)) for m in re.finditer(r"converting the packaged model: +(\d+)% ", caplog.text)]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100 and len(percents) >= 4
    caplog.clear()
    load_llm(Settings(data_dir=tmp_path, model_cache_dir=tmp_path / "models"))  # converted once: no progress again
    assert "converting the packaged model" not in caplog.text
