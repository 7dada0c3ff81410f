"""Fixtures for end-to-end tests: the real `flatmesh` binary on loopback, real models."""
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FLATMESH_BIN", ROOT / "target" / "debug" / "flatmesh"))
MODELS = Path(os.environ.get("FLATMESH_MODELS_DIR", ROOT / "models"))
LLM = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"


class Agent:
    """One agent process on port 0; `url` is read back from its address file."""

    def __init__(self, config: str = "", ready_timeout: float = 180.0, extra_args=(), env=None):
        self.dir = tempfile.TemporaryDirectory(prefix="flatmesh-e2e-")
        cfg = Path(self.dir.name) / "flatmesh.toml"
        cfg.write_text(config)
        self.addr_file = Path(self.dir.name) / "addr.json"
        self.log = open(Path(self.dir.name) / "agent.log", "w+")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(cfg), "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
             "--addr-file", str(self.addr_file), "--models-dir", str(MODELS),
             *([] if "--state-dir" in extra_args else ["--state-dir", str(Path(self.dir.name) / "state")]),
             *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + ready_timeout
        while not self.addr_file.exists():
            self._check_alive()
            if time.time() > deadline:
                raise TimeoutError("agent did not start listening")
            time.sleep(0.05)
        addrs = json.loads(self.addr_file.read_text())
        self.url = "http://" + addrs["http"]
        self.grpc = addrs["grpc"]
        while True:
            self._check_alive()
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("agent did not become ready:\n" + self.logs())
            time.sleep(0.1)

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()
        return self.proc.returncode


@pytest.fixture(scope="session")
def agent():
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    a = Agent()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def client(agent):
    from openai import OpenAI
    return OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def key_for(agent, tenant, admin_token="admin-secret"):
    """A new API key of `tenant`, made through the admin API."""
    r = httpx.post(f"{agent.url}/admin/tenants/{tenant}/keys", headers={"authorization": f"Bearer {admin_token}"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


ETCD = Path(os.environ.get("FLATMESH_ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One real single-member etcd on free loopback ports, its data in a temporary directory.

    `endpoint` is its client URL. `stop()` ends it (SIGTERM) and keeps the data, `kill()` ends
    it with SIGKILL, `restart()` starts it again on the same ports and data, `close()` stops it
    and removes the data. Skips the test when the etcd binary (Debian `etcd-server`) is missing.
    """

    def __init__(self, ready_timeout: float = 60.0, tls=None):
        if not ETCD.exists():
            pytest.skip(f"{ETCD} is missing: apt-get install etcd-server (./tests/run installs it)")
        self.dir = tempfile.TemporaryDirectory(prefix="flatmesh-etcd-")
        self.data = Path(self.dir.name) / "data"
        self.client_port, self.peer_port = free_port(), free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        # `tls`: {"ca", "cert", "key", "client_cert", "client_key"} paths: clients must present
        # a certificate signed by the CA, over https.
        self.tls = tls
        scheme = "https" if tls else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.peer = f"http://127.0.0.1:{self.peer_port}"
        self.ready_timeout = ready_timeout
        self.log = open(Path(self.dir.name) / "etcd.log", "a+")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [str(ETCD), "--name", "default", "--data-dir", str(self.data),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
             "--initial-cluster", f"default={self.peer}", "--initial-cluster-state", "new",
             "--logger", "zap", "--log-outputs", "stderr",
             *(["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"] if self.tls else [])],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.logs()}")
            if self.healthy():
                return
            if time.time() > deadline:
                raise TimeoutError("etcd did not become healthy:\n" + self.logs())
            time.sleep(0.1)

    def healthy(self) -> bool:
        """etcd 3.4 answers `{"health":"true"}` (3.5 adds a `reason`) once it has a leader."""
        verify = True
        if self.tls:
            verify = ssl.create_default_context(cafile=self.tls["ca"])
            verify.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
        try:
            r = httpx.get(self.endpoint + "/health", timeout=2, verify=verify)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout=30) -> int:
        """SIGTERM and wait; the data directory stays for `restart()`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else 0

    def kill(self) -> int:
        """SIGKILL and wait (a crash: nothing is flushed or handed over)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def restart(self):
        """Stop it if it runs, then start it again on the same ports with the same data."""
        self.stop()
        self.start()

    def close(self):
        """Stop it and remove its data."""
        self.stop()
        self.log.close()
        self.dir.cleanup()
