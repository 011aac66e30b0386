"""The calibration file is edited entry by entry: setting one entry keeps every other entry's bytes."""

from __future__ import annotations

import json

import pytest

from bench.codec_calibrate import with_entry


def test_setting_an_entry_keeps_the_others_bytes() -> None:
    text = json.dumps({"shape": [2, 1, 4], "keys": [0.125, 1e-05], "key_basis": {"data": "AAA=", "weight": [1.5]}},
                      separators=(",", ":"))
    added = with_entry(text, "query_spread", '{"data":"BBB="}')
    assert added.startswith(text[:-1]) and json.loads(added)["query_spread"] == {"data": "BBB="}
    replaced = with_entry(added, "key_basis", '{"data":"CCC=","weight":[2.0]}')
    raw = json.loads(replaced)
    assert raw["key_basis"] == {"data": "CCC=", "weight": [2.0]} and raw["query_spread"] == {"data": "BBB="}
    assert replaced.startswith('{"shape":[2,1,4],"keys":[0.125,1e-05]')


def test_an_entry_written_another_way_is_not_guessed_at() -> None:
    text = '{"shape": [1], "key_basis": {"data": "AAA="}}'
    with pytest.raises(SystemExit):
        with_entry(text, "key_basis", '{"data":"CCC="}')
