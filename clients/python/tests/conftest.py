"""Starts a real deft-server (the model in DEFT_TEST_MODEL) on a free loopback port for the
session, with an API key file, and waits for its health to turn SERVING.

Env: DEFT_SERVER_BIN (default <repo>/build/bin/deft-server), DEFT_TEST_MODEL (default the cached
SmolLM2 GGUF). A missing binary or model fails the tests (it never skips them).
"""
import os
import pathlib
import socket
import subprocess
import time

import pytest

from deft_client import DeftClient, DeftError

REPO = pathlib.Path(__file__).resolve().parents[3]
KEY = "py-test-secret-0123456789"
SMALL_KEY = "py-small-secret-0123456789"  # kv_blocks=4, nodes=3
READONLY_KEY = "py-reader-secret-0123456789"
KEY_FILE = f"""# deft-client tests
py {KEY}
small {SMALL_KEY} kv_blocks=4 nodes=3
reader {READONLY_KEY} readonly
"""
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    binary = pathlib.Path(os.environ.get("DEFT_SERVER_BIN", REPO / "build" / "bin" / "deft-server"))
    model = pathlib.Path(os.environ.get(
        "DEFT_TEST_MODEL",
        pathlib.Path.home() / ".cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert binary.is_file(), f"deft-server not built: {binary} (set DEFT_SERVER_BIN)"
    assert model.is_file(), f"model not found: {model} (set DEFT_TEST_MODEL)"
    tmp = tmp_path_factory.mktemp("deft-server")
    keys = tmp / "keys.txt"
    keys.write_text(KEY_FILE)
    log = open(tmp / "server.log", "w+")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), f"--listen={address}", f"--model={model}", f"--api_keys={keys}",
         "--kv_pool_mb=64", "--max_tokens_limit=256", "--shutdown_grace_seconds=2",
         # fp32 weights: greedy comparisons across differently batched steps stay exact.
         "--exact"],
        stdout=log, stderr=subprocess.STDOUT)
    probe = DeftClient(address, timeout=2)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"deft-server exited with {proc.returncode}:\n{log.read()}")
            try:
                status = probe.health()
                if status == "SERVING":
                    break
            except DeftError:
                pass  # not listening yet
            time.sleep(0.1)
        else:
            pytest.fail(f"deft-server not SERVING after {STARTUP_TIMEOUT_S}s (last: {status})")
        yield address
    finally:
        probe.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _keyed_client(address, key):
    """A client with `key`; the key's trees are deleted afterwards."""
    with DeftClient(address, api_key=key, timeout=120) as c:
        yield c
        for t in c.list_trees():
            c.delete_tree(t.tree_id)


@pytest.fixture
def client(server):
    yield from _keyed_client(server, KEY)


@pytest.fixture
def small_client(server):  # kv_blocks=4, nodes=3
    yield from _keyed_client(server, SMALL_KEY)
