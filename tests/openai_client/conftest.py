"""Starts `mixserve serve` (the shipped tiny model, or a given one) for the official `openai` client tests."""

import contextlib
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


def mixserve_binary() -> str:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return os.environ.get("MIXSERVE_BIN", str(target / "debug" / "mixserve"))


@contextlib.contextmanager
def running_server(model: Path, *args: str):
    """`mixserve serve --model MODEL ARGS` on a free port until healthy; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [mixserve_binary(), "serve", "--model", str(model), "--port", str(port), *args],
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
    try:
        yield base
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=30) == 0, "SIGTERM must shut the server down cleanly"
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="session")
def server():
    with running_server(
        ROOT / "models" / "tiny-mixtral",
        "--served-model-name", "tiny-mixtral", "--api-key", API_KEY, "--kv-cache-memory", "64MiB",
    ) as base:
        yield base
