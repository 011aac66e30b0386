"""A kvrag server over the tiny random-weight model, as a real process that tests can SIGKILL.

Loading torch, transformers and the embedder takes tens of seconds on a busy small machine, far
too long to pay once per kill. So this runs as a *fork server*: it imports and builds everything
once (the tiny model with a fixed seed, so its fingerprint never changes), then reads commands on
stdin. ``serve <json>`` (``{"data_dir": ..., "database_url": ..., "settings": {...}}``) binds a free
loopback port, forks, and prints ``pid <pid> port <port>``; the child opens the store on that data
directory and catalog and runs uvicorn as ``kvrag serve`` does. Each child is
a separate process with its own catalog connections, blob writes and FAISS state: killing it is a
real crash of a real server. ``exit`` (or end of input) stops the fork server.

    python -m tests.reliability.serve_tiny --log-dir L
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

# One thread everywhere, set before torch loads: OpenMP thread pools do not survive fork().
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ADMIN_KEY = "reliability-admin-key-0123456789"


def _settings(spec: dict[str, Any]) -> Any:
    from server.settings import ServerSettings

    extra: dict[str, Any] = dict(spec.get("settings") or {})
    extra.setdefault("admin_key", ADMIN_KEY)
    extra.setdefault("torch_threads", 1)
    if spec.get("database_url"):
        extra["database_url"] = spec["database_url"]
    return ServerSettings(data_dir=Path(spec["data_dir"]), **extra)


def _child(log_dir: Path, spec: dict[str, Any], sock: socket.socket, llm: Any, embedder: Any) -> None:
    """Run one server life on ``sock``; never returns."""
    import uvicorn

    from kvstore.bank import BankStore
    from server.app import create_app
    from server.worker import released_turn

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    log_path = log_dir / f"server-{os.getpid()}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        os.environ.update(spec.get("env") or {})  # e.g. the AWS variables of an object store started by the test
        settings = _settings(spec)
        store = BankStore(settings, llm=llm, embedder=embedder, while_waiting=released_turn)
        if "maintain" in spec:
            _maintain(store, spec["maintain"])
            return
        server = uvicorn.Server(uvicorn.Config(create_app(settings, store), log_level="info", lifespan="on",
                                               timeout_graceful_shutdown=30))
        server.run(sockets=[sock])
    except BaseException:  # noqa: BLE001 - a forked child must never fall back into the fork loop
        logging.exception("server child failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _maintain(store: Any, job: dict[str, Any]) -> None:
    """Run full maintenance of one bank with no orphan grace period (nothing is in flight: no server
    runs) and write its report as JSON to ``job["out"]``."""
    store.memory.config.orphan_grace_s = 0.0
    report = store.maintain(job["bank"])
    store.close()
    Path(job["out"]).write_text(json.dumps(report, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", required=True, type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    # Import what every life needs now, so a fork starts in about a second.
    import alembic.command  # noqa: F401
    import uvicorn  # noqa: F401

    import kvstore.bank  # noqa: F401
    import server.app  # noqa: F401
    from kvstore.config import Settings
    from kvstore.model.loader import Embedder
    from tests.conftest import build_tiny

    llm = build_tiny("llama", seed=0)
    embedder = Embedder(Settings(data_dir=args.log_dir))
    embedder.embed(["warm up the tokenizer and weights once, before any fork"])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(f"ready {llm.fingerprint}", flush=True)
    for line in sys.stdin:
        command, _, payload = line.strip().partition(" ")
        if command in ("", "exit"):
            break
        if command != "serve":
            print(f"error unknown command {command}", flush=True)
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            _child(args.log_dir, json.loads(payload), sock, llm, embedder)
        sock.close()
        print(f"pid {pid} port {port}", flush=True)


if __name__ == "__main__":
    main()
