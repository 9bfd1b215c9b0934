"""The embedded stack behind `prunery up`: the API server in this process and one worker process,
on SQLite, a folder object store and kombu's server-less `filesystem://` broker, all under one data
folder. Prints `address: HOST:PORT` and `token: TOKEN` for other tools, then serves until SIGINT or
SIGTERM, when it stops the API and the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

# the production variables would point the embedded stack at other servers: `up` owns its data folder
_EMBEDDED_OVERRIDES = ("PRUNERY_DATABASE_URL", "PRUNERY_STORE_URL", "PRUNERY_BROKER_URL", "PRUNERY_BROKER_KEYPREFIX")


def embedded_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _EMBEDDED_OVERRIDES}
    env["PRUNERY_DATA_DIR"] = str(data_dir)
    env["PRUNERY_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    return env


def run_embedded(data_dir: Path, port: int = 50051) -> int:
    from prunery.service.api.server import build_server
    from prunery.service.api.settings import Settings
    from prunery.service.store import db, tokens

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = embedded_env(data_dir, port)
    os.environ.clear()
    os.environ.update(env)
    settings = Settings.from_env()
    db.upgrade(settings.database_url)
    token = tokens.create(settings.database_url, "default", "prunery up")
    server = build_server(settings)
    worker = subprocess.Popen([sys.executable, "-m", "prunery.cli", "worker"], env=env)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        print(f"address: 127.0.0.1:{server.port}", flush=True)
        print(f"token: {token}", flush=True)
        print(f"data: {data_dir} (Ctrl-C stops the API and the worker)", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if worker.poll() is not None:
                print(f"prunery: error: the worker exited with code {worker.returncode}", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop(5)
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
