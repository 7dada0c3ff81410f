"""The mesh through an etcd that speaks only TLS and asks every client for a certificate
(`--client-cert-auth`), as a production etcd does: nodes with `[mesh.etcd_tls]` join and
serve as one; a node whose certificate another CA signed never joins, says why, and serves
alone; a config that mixes up https and TLS settings is refused at start.
"""
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import BIN, EMBED, MODELS, Agent, Etcd
from test_mesh import ADMIN, holders, mesh_config, nodes, served_by, wait_until


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def make_cert(d: Path, ca: str, name: str, san: str):
    """A certificate for `name` signed by `ca`, valid for `san` (server) and as a client."""
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "etcd", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "ca", "node", "DNS:node")
    make_ca(d, "stranger-ca")                     # a CA etcd does not trust
    make_cert(d, "stranger-ca", "stranger", "DNS:stranger")
    return d


def tls_config(etcd: Etcd, node: str, pki: Path, client: str = "node") -> str:
    return mesh_config(etcd, node, "/flatmesh-tls") + f"""
[mesh.etcd_tls]
ca = "{pki / 'ca.crt'}"
cert = "{pki / f'{client}.crt'}"
key = "{pki / f'{client}.key'}"
"""


@pytest.fixture(scope="module")
def tls_etcd(pki):
    e = Etcd(tls={"ca": str(pki / "ca.crt"), "cert": str(pki / "etcd.crt"), "key": str(pki / "etcd.key"),
                  "client_cert": str(pki / "node.crt"), "client_key": str(pki / "node.key")})
    yield e
    e.close()


def test_nodes_with_client_certificates_join_through_a_tls_etcd_and_serve_as_one(pki, tls_etcd):
    assert tls_etcd.endpoint.startswith("https://")
    agents = {}
    try:
        for name in ("t1", "t2"):
            agents[name] = Agent(config=tls_config(tls_etcd, name, pki))
        t1, t2 = agents["t1"], agents["t2"]
        wait_until(lambda: set(nodes(t1)) == {"t1", "t2"}, 30, lambda: t1.logs())
        r = httpx.post(f"{t2.url}/admin/models/{EMBED}/load", headers=ADMIN, timeout=120)
        assert r.status_code == 200, r.text
        wait_until(lambda: holders(t1, EMBED) == {"t2"}, 10, lambda: nodes(t1))
        r = httpx.post(t1.url + "/v1/embeddings", json={"model": EMBED, "input": "over TLS"}, timeout=60)
        assert r.status_code == 200 and served_by(r) == "t2", (r.status_code, r.headers, r.text)

        # A node whose certificate etcd does not trust never joins, and says why...
        stranger = Agent(config=tls_config(tls_etcd, "t3", pki, client="stranger"))
        agents["t3"] = stranger
        time.sleep(3)
        assert set(nodes(t1)) == {"t1", "t2"}
        log = stranger.logs()
        assert "Cannot join the mesh through etcd" in log, log
        # ... and serves alone meanwhile.
        assert httpx.get(stranger.url + "/readyz").status_code == 200
        r = httpx.post(stranger.url + "/v1/embeddings", json={"model": EMBED, "input": "alone"}, timeout=120)
        assert r.status_code == 200 and served_by(r) == "t3", (r.status_code, r.headers, r.text)
    finally:
        for a in agents.values():
            a.stop()


@pytest.mark.parametrize("mesh_table, says", [
    ('etcd = ["https://127.0.0.1:2379"]', "set mesh.etcd_tls"),
    ('etcd = ["http://127.0.0.1:2379"]\n[mesh.etcd_tls]\nca = "{ca}"', "use https:// endpoints"),
    ('etcd = ["https://127.0.0.1:2379"]\n[mesh.etcd_tls]\nca = "{ca}"\ncert = "{ca}"', "cert and key go together"),
    ('etcd = ["https://127.0.0.1:2379"]\n[mesh.etcd_tls]\nca = "/nowhere/ca.crt"', "mesh.etcd_tls.ca: /nowhere/ca.crt"),
    ('etcd = ["https://127.0.0.1:2379"]\n[mesh.etcd_tls]\nca = "{ca}"\ncert = "{key}"\nkey = "{key}"',
     "mesh.etcd_tls.cert"),
])
def test_a_config_that_mixes_up_https_and_tls_is_refused_at_start(pki, tmp_path, mesh_table, says):
    cfg = tmp_path / "flatmesh.toml"
    table = mesh_table.format(ca=pki / "ca.crt", key=pki / "node.key")
    cfg.write_text('[server]\nadmin_token = "t"\n[mesh]\n' + table + "\n")
    r = subprocess.run([str(BIN), "serve", "--config", str(cfg), "--http-addr", "127.0.0.1:0",
                        "--grpc-addr", "127.0.0.1:0", "--models-dir", str(MODELS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert says in r.stderr + r.stdout, r.stderr + r.stdout
