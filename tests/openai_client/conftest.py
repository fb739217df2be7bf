"""Starts `mixserve serve` on the shipped tiny model for the official `openai` client tests."""

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = os.environ.get("MIXSERVE_BIN", str(target / "debug" / "mixserve"))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary, "serve", "--model", str(ROOT / "models" / "tiny-mixtral"),
            "--served-model-name", "tiny-mixtral", "--port", str(port),
            "--api-key", API_KEY, "--kv-cache-memory", "64MiB",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("mixserve did not become healthy: " + proc.stderr.read().decode())
        time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0, "SIGTERM must shut the server down cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
