"""``pip install ./client`` into a fresh virtualenv, then a script that uses the installed SDK as a user would
(``timeout=``, ``with_options()``, raw responses) against a live server: the wheel carries what the
features need, and nothing of the engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.client.live import Live, live  # noqa: F401 - the fixture, by name

CLIENT = Path(__file__).resolve().parents[2] / "client"

SCRIPT = textwrap.dedent("""
    import sys
    import kvrag_client
    from kvrag_client import KVRag, APITimeoutError

    assert "torch" not in sys.modules and kvrag_client.__file__.startswith(sys.prefix), kvrag_client.__file__
    url = sys.argv[1]
    with KVRag(url, timeout=30) as kv:
        made = kv.with_raw_response.banks.create("installed", eviction="lru")
        assert made.status_code == 201 and made.parsed.name == "installed"
        kv.documents.put("installed", "a", "The Normans gave their name to Normandy.", timeout=20)
        raw = kv.with_raw_response.documents.get("installed", "a")
        assert raw.status_code == 200 and raw.headers["etag"] == '"1"' and raw.parse().text
        fast = kv.with_options(timeout=10, max_retries=0, headers={"X-Request-ID": "from-the-wheel"})
        echoed = fast.with_raw_response.banks.get("installed")
        assert echoed.request_id == "from-the-wheel" and echoed.parsed.documents == 1
        print("ok", kvrag_client.__version__)
""")


@pytest.mark.slow  # ~30 s: a venv plus a dependency resolution through pip
def test_installed_client_against_a_live_server(tmp_path: Path, live: Live) -> None:  # noqa: F811
    src = tmp_path / "client"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], check=True)
    script = tmp_path / "use_sdk.py"
    script.write_text(SCRIPT)
    # No PYTHONPATH: the script must run on what pip installed, from a folder without the checkout.
    out = subprocess.run([str(py), str(script), live.url], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": str(venv / "bin"), "HOME": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 0.1.0"
