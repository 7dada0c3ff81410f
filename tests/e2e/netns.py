"""Separate network hosts on one machine for the mesh's fault tests: Linux network namespaces.

`Hosts` makes one namespace, "p"'s host, joined to this machine by a veth pair. This machine's
end of the pair carries three addresses: the peers' (`PEER_IP`, where agents "a" and "b" and
nothing else listen), etcd's (`ETCD_IP`) and the clients' (`CLIENT_IP`, the source address of
the tests' requests to p). So each can be cut from p alone:

- `cut("etcd")`: packets between p and etcd vanish (p still reaches its peers, clients reach p);
- `cut("peers")`: packets between p and the peers vanish (etcd and clients still reach p);
- `down()` / `up()`: p's end of the link down: nothing reaches p or leaves it (a flapping link,
  or, with the agent killed while it is down, a host gone without a word);
- `heal()`: every route back;
- `lossy(percent)`: a share of the packets between p and the peers dropped at random, both
  ways (nftables' `numgen random`; the kernel here has no `sch_netem`), `lossless()` undoes it.

`Delay` is the delay `netem` would add: a TCP relay on this host that hands each chunk on a
fixed time after it arrived, both ways; p advertises the relay's address to its peers.

Everything is made with `ip` from Debian's iproute2 and removed by `close()`, which the fixtures
call in a `finally`. Without root (or where namespaces cannot be made) the test is skipped.
"""
import json
import os
import shutil
import socket
import subprocess
import threading
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import BIN, MODELS, Etcd

ADMIN = {"authorization": "Bearer admin-secret"}
NET = 200 + os.getpid() % 50
PEER_IP, NODE_IP = f"10.{NET}.0.1", f"10.{NET}.0.2"
ETCD_IP, CLIENT_IP = f"10.{NET}.1.1", f"10.{NET}.2.1"
NS, VETH_HOST, VETH_NS = f"fmp{os.getpid()}", f"fmh{os.getpid()}", f"fmn{os.getpid()}"


def ip(*args, ns=None, check=True):
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Hosts:
    """p's namespace and the link to it; see the module's docs."""

    def __init__(self):
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        try:
            ip("netns", "add", NS)
        except (RuntimeError, FileNotFoundError) as e:
            pytest.skip(f"cannot make a network namespace here: {e}")
        try:
            ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NS)
            ip("addr", "add", f"{PEER_IP}/24", "dev", VETH_HOST)
            for extra in (ETCD_IP, CLIENT_IP):
                ip("addr", "add", f"{extra}/32", "dev", VETH_HOST)
            ip("link", "set", VETH_HOST, "up")
            ip("addr", "add", f"{NODE_IP}/24", "dev", VETH_NS, ns=NS)
            ip("link", "set", "lo", "up", ns=NS)
            self.up()
            self.heal()
        except BaseException:
            self.close()
            raise

    def cut(self, what: str):
        """Packets from p to `what` ("etcd" or "peers") vanish."""
        to = {"etcd": ETCD_IP, "peers": PEER_IP}[what]
        ip("route", "replace", "blackhole", f"{to}/32", ns=NS)

    def heal(self):
        # `onlink`: the gateway is on the link even while a route to its own address is cut.
        for to in (ETCD_IP, CLIENT_IP):
            ip("route", "replace", f"{to}/32", "via", PEER_IP, "dev", VETH_NS, "onlink", ns=NS)
        ip("route", "del", f"{PEER_IP}/32", ns=NS, check=False)

    def lossy(self, percent: int):
        """Drop `percent` % of the packets between p and its peers, each way, at random."""
        if not shutil.which("nft"):
            pytest.skip("nft (Debian's nftables) is not installed")
        rules = f"""
table inet flatmesh_loss {{
    chain inbound {{ type filter hook input priority 0; ip saddr {PEER_IP} numgen random mod 100 < {percent} counter drop; }}
    chain outbound {{ type filter hook output priority 0; ip daddr {PEER_IP} numgen random mod 100 < {percent} counter drop; }}
}}
"""
        r = subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], input=rules, text=True,
                           capture_output=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"nftables cannot drop packets here: {r.stderr.strip()}")

    def dropped(self) -> int:
        """Packets `lossy` has dropped so far, both ways."""
        import re
        r = subprocess.run(["ip", "netns", "exec", NS, "nft", "list", "table", "inet", "flatmesh_loss"],
                           capture_output=True, text=True, timeout=30)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", r.stdout))

    def lossless(self):
        subprocess.run(["ip", "netns", "exec", NS, "nft", "delete", "table", "inet", "flatmesh_loss"],
                       capture_output=True, timeout=30)

    def down(self):
        ip("link", "set", VETH_NS, "down", ns=NS)

    def up(self):
        ip("link", "set", VETH_NS, "up", ns=NS)
        self.heal()

    def close(self):
        ip("netns", "del", NS, check=False)  # takes its end of the veth pair, and so both
        ip("link", "del", VETH_HOST, check=False)


class Delay:
    """A TCP relay from `listen` (host, port) to `target` that hands every chunk on `seconds`
    after it arrived, in each direction (not throttled: chunks in flight overlap)."""

    def __init__(self, listen: tuple, target: tuple, seconds: float):
        self.target, self.seconds, self.closed = target, seconds, threading.Event()
        self.server = socket.create_server(listen)
        self.address = self.server.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def free_port(host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                self._pipe(src, dst)

    def _pipe(self, src, dst):
        import queue
        chunks = queue.Queue()

        def read():
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self.seconds, data))
                if not data:
                    return

        def write():
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return
        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self):
        self.closed.set()
        self.server.close()


class Node:
    """An agent bound to `addr`, in namespace `ns` when given, in a mesh on `etcd`."""

    def __init__(self, name: str, etcd: Etcd, addr: str, prefix: str, ttl: float, ns=None,
                 extra: str = ""):
        self.name, self.dir = name, tempfile.TemporaryDirectory(prefix="flatmesh-netns-")
        d = Path(self.dir.name)
        (d / "flatmesh.toml").write_text(f"""
[server]
admin_token = "admin-secret"
[cache]
preload = false
[mesh]
etcd = ["{etcd.endpoint}"]
node = "{name}"
prefix = "{prefix}"
lease_ttl = "{int(ttl)}s"
token = "mesh-secret"
{extra}
""")
        self.log = open(d / "agent.log", "w+")
        cmd = [str(BIN), "serve", "--config", str(d / "flatmesh.toml"), "--http-addr", f"{addr}:0",
               "--grpc-addr", f"{addr}:0", "--addr-file", str(d / "addr.json"),
               "--models-dir", str(MODELS), "--state-dir", str(d / "state")]
        self.proc = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        # p's clients come from CLIENT_IP: a cut from the peers leaves them through.
        self.http = httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_IP)
                                 if ns else None, timeout=120)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, f"{name} exited:\n{self.logs()}"
            assert time.time() < deadline, f"{name} did not become ready:\n{self.logs()}"
            try:
                self.url = "http://" + json.loads((d / "addr.json").read_text())["http"]
                if self.http.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.1)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def view(self) -> dict:
        r = self.http.get(self.url + "/admin/mesh", headers=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def sees(self) -> set:
        try:
            return {n["node"] for n in self.view()["nodes"]}
        except (AssertionError, httpx.HTTPError, ValueError, KeyError):
            return set()

    def holders(self, model: str) -> set:
        return {n["node"] for n in self.view()["nodes"]
                if any(m["id"] == model and m["ready"] > 0 for m in n["models"])}

    def embed(self, model: str, text: str, timeout: float = 120) -> httpx.Response:
        return self.http.post(self.url + "/v1/embeddings", timeout=timeout,
                              json={"model": model, "input": text, "keep_alive": -1})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.log.close()
        self.dir.cleanup()


def wait_until(pred, timeout: float, what) -> float:
    """Seconds until `pred()` holds; fails with `what` (or what it returns) after `timeout`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(0.05)
    return time.monotonic() - start


def three_hosts(prefix: str, ttl: float, extra: str = "", p_extra: str = ""):
    """A fixture body: p's host, etcd at ETCD_IP, a and b at PEER_IP, p in its namespace, all
    seeing each other. Yields (hosts, etcd, nodes); `p_extra` goes into p's `[mesh]` alone."""
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    net = Hosts()
    etcd, nodes = None, {}
    try:
        etcd = Etcd(host=ETCD_IP)
        for name in ("a", "b"):
            nodes[name] = Node(name, etcd, PEER_IP, prefix, ttl, extra=extra)
        nodes["p"] = Node("p", etcd, NODE_IP, prefix, ttl, ns=NS, extra=p_extra + extra)
        wait_until(lambda: all(n.sees() == set(nodes) for n in nodes.values()), 30,
                   lambda: {k: sorted(n.sees()) for k, n in nodes.items()})
        yield net, etcd, nodes
    finally:
        for n in nodes.values():
            n.stop()
        if etcd is not None:
            etcd.close()
        net.close()
