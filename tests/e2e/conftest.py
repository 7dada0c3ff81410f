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

    def __init__(self, ready_timeout: float = 60.0, tls=None, host: str = "127.0.0.1"):
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
        # `host`: the address it listens on (another than loopback for tests with network
        # namespaces).
        self.endpoint = f"{scheme}://{host}:{self.client_port}"
        self.peer = f"http://{host}:{self.peer_port}"
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


class EtcdCluster:
    """A real three-member etcd cluster on free loopback ports, each member's data in a temporary
    directory (etcd's default heartbeat and election timeouts, as deployed).

    `endpoints[i]` is member i's client URL. `leader()` is the index of the member etcd says
    leads now, `kill(i)` ends member i with SIGKILL, `close()` ends every member and removes the
    data (call it in a `finally`). Skips the test when the etcd binary is missing.
    """

    def __init__(self, members: int = 3, ready_timeout: float = 60.0):
        if not ETCD.exists():
            pytest.skip(f"{ETCD} is missing: apt-get install etcd-server (./tests/run installs it)")
        self.dir = tempfile.TemporaryDirectory(prefix="flatmesh-etcd3-")
        ports = set()
        while len(ports) < 2 * members:
            ports.add(free_port())
        ports = sorted(ports)
        self.names = [f"m{i}" for i in range(members)]
        self.endpoints = [f"http://127.0.0.1:{p}" for p in ports[:members]]
        self.peers = [f"http://127.0.0.1:{p}" for p in ports[members:]]
        cluster = ",".join(f"{n}={p}" for n, p in zip(self.names, self.peers))
        self.logs = [open(Path(self.dir.name) / f"{n}.log", "a+") for n in self.names]
        self.procs = []
        try:
            for i, name in enumerate(self.names):
                self.procs.append(subprocess.Popen(
                    [str(ETCD), "--name", name, "--data-dir", str(Path(self.dir.name) / name),
                     "--listen-client-urls", self.endpoints[i], "--advertise-client-urls", self.endpoints[i],
                     "--listen-peer-urls", self.peers[i], "--initial-advertise-peer-urls", self.peers[i],
                     "--initial-cluster", cluster, "--initial-cluster-state", "new",
                     "--initial-cluster-token", Path(self.dir.name).name,
                     "--logger", "zap", "--log-outputs", "stderr"],
                    stdout=self.logs[i], stderr=subprocess.STDOUT))
            deadline = time.time() + ready_timeout
            while not all(self.healthy(i) for i in range(members)):
                for i, p in enumerate(self.procs):
                    if p.poll() is not None:
                        raise RuntimeError(f"etcd {self.names[i]} exited with {p.returncode}:\n{self.log(i)}")
                if time.time() > deadline:
                    raise TimeoutError("the etcd cluster did not become healthy:\n"
                                       + "\n".join(self.log(i)[-2000:] for i in range(members)))
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def healthy(self, i: int) -> bool:
        try:
            r = httpx.get(self.endpoints[i] + "/health", timeout=2)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def alive(self, i: int) -> bool:
        return self.procs[i].poll() is None

    def status(self, i: int) -> dict:
        """Member i's maintenance status (etcd's JSON gateway: ids are strings)."""
        r = httpx.post(self.endpoints[i] + "/v3/maintenance/status", json={}, timeout=2)
        r.raise_for_status()
        return r.json()

    def leader(self) -> int:
        """The index of the member that leads now, as the live members say."""
        ids, leaders = {}, set()
        for i in range(len(self.procs)):
            if self.alive(i):
                s = self.status(i)
                ids[s["header"]["member_id"]] = i
                leaders.add(s.get("leader"))
        assert len(leaders) == 1 and next(iter(leaders)) in ids, f"no agreed leader: {leaders} of {ids}"
        return ids[next(iter(leaders))]

    def get_prefix(self, prefix: str) -> dict:
        """Every key under `prefix` and its value, read (linearizably) from a live member."""
        import base64
        enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
        end = prefix.encode()[:-1] + bytes([prefix.encode()[-1] + 1])
        i = next(i for i in range(len(self.procs)) if self.alive(i))
        r = httpx.post(self.endpoints[i] + "/v3/kv/range", timeout=5,
                       json={"key": enc(prefix.encode()), "range_end": enc(end)})
        r.raise_for_status()
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                for kv in r.json().get("kvs", [])}

    def log(self, i: int) -> str:
        self.logs[i].flush()
        self.logs[i].seek(0)
        return self.logs[i].read()

    def kill(self, i: int):
        """SIGKILL member i and wait (a crash: nothing is flushed or handed over)."""
        if self.alive(i):
            self.procs[i].kill()
            self.procs[i].wait()

    def close(self):
        """End every member and remove the data."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        self.dir.cleanup()


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server's bin directory (`FLATMESH_PG_BIN` wins), or None."""
    if os.environ.get("FLATMESH_PG_BIN"):
        return Path(os.environ["FLATMESH_PG_BIN"])
    found = [d / "bin" for d in Path("/usr/lib/postgresql").glob("*") if (d / "bin" / "initdb").exists()]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return found[-1] if found else None


class Postgres:
    """One real PostgreSQL server (Debian `postgresql`) on a free loopback port, its cluster made
    by initdb in a temporary directory (password login over TCP, user and database `flatmesh`).

    With `tls=(cert, key)` it speaks TLS with that certificate and takes TCP connections over
    TLS only (`hostssl`); `url` then has no `sslmode`.

    `url` is its connection URL. `stop()` stops it (fast shutdown) and keeps the data, `start()`
    starts it again on the same port, `sql(query)` runs a query with psql and returns the rows
    (lists of strings), `close()` stops it and removes the data (call it in a `finally`). Run as
    root, the server runs as the `postgres` user. Skips the test when initdb is missing.
    """

    PASSWORD = "ledger-secret"

    def __init__(self, ready_timeout: float = 60.0, tls: tuple[Path, Path] | None = None):
        self.bin = postgres_bin()
        if self.bin is None or not (self.bin / "pg_ctl").exists():
            pytest.skip("PostgreSQL is missing (no /usr/lib/postgresql/*/bin/initdb): "
                        "apt-get install postgresql (./deploy/setup lists it)")
        self.user = None
        if os.geteuid() == 0:  # initdb refuses root: hand the cluster to the postgres user
            import pwd
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root without a `postgres` user to run PostgreSQL as")
        self.dir = tempfile.TemporaryDirectory(prefix="flatmesh-pg-")
        root = Path(self.dir.name)
        self.data, self.sockets, self.logfile = root / "data", root / "sock", root / "postgres.log"
        self.sockets.mkdir()
        pwfile = root / "pw"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.user:
            for p in (root, self.sockets, pwfile):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.url = f"postgres://flatmesh:{self.PASSWORD}@127.0.0.1:{self.port}/flatmesh"
        if tls is None:
            self.url += "?sslmode=disable"
        self.ready_timeout = ready_timeout
        self.options = ""
        try:
            self._run("initdb", "-D", str(self.data), "-U", "flatmesh", f"--pwfile={pwfile}",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
            if tls:
                self._use_tls(*tls)
            self.start()
            self._run("createdb", "-h", str(self.sockets), "-p", str(self.port), "-U", "flatmesh", "flatmesh")
        except BaseException:
            self.close()
            raise

    def _use_tls(self, cert: Path, key: Path):
        """The server's certificate and key in its data directory (the key private to it), and
        TCP logins over TLS only."""
        for src, name in ((cert, "server.crt"), (key, "server.key")):
            dst = self.data / name
            dst.write_bytes(Path(src).read_bytes())
            dst.chmod(0o600)
            if self.user:
                os.chown(dst, self.user.pw_uid, self.user.pw_gid)
        hba = self.data / "pg_hba.conf"
        lines = [("hostssl" + l[4:]) if l.startswith("host ") else l for l in hba.read_text().splitlines()]
        hba.write_text("\n".join(lines) + "\n")
        self.options = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"

    def _run(self, tool: str, *args, timeout: float = 60.0) -> str:
        kw = {"user": self.user.pw_uid, "group": self.user.pw_gid} if self.user else {}
        r = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True,
                           timeout=timeout, cwd=self.dir.name, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.logs()}")
        return r.stdout

    def start(self):
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", str(int(self.ready_timeout)),
                  "-o", f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off{self.options}",
                  "start", timeout=self.ready_timeout + 5)

    def stop(self):
        """Stop it (fast: open sessions are cut); the data stays for `start()`."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def sql(self, query: str) -> list:
        out = self._run("psql", "-h", str(self.sockets), "-p", str(self.port), "-U", "flatmesh", "-d", "flatmesh",
                        "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", query)
        return [line.split("\t") for line in out.splitlines() if line]

    def logs(self) -> str:
        try:
            return self.logfile.read_text()
        except OSError:
            return ""

    def close(self):
        """Stop it and remove its data."""
        try:
            self.stop()
        finally:
            self.dir.cleanup()
