"""The shared ledger over TLS: one real PostgreSQL that takes TCP logins over TLS only
(`hostssl`, its certificate from a test CA, made with openssl). An agent with
`sslmode=verify-full` and that CA ships its records over TLS; one that trusts another CA, and
one with `sslmode=disable`, ship nothing, count the failures, keep serving and keep every
record in their outbox; `verify-full` without a CA file is refused at start, naming what is
missing.
"""
import subprocess
import time

import httpx
import pytest

from conftest import BIN, LLM, Agent, Postgres
from test_ledger_pg import SHIPPING, metric
from test_mesh_tls import make_ca, make_cert
from test_tenancy import CONFIG, client, key_for


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg-pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "db", "IP:127.0.0.1,DNS:localhost")
    make_ca(d, "stranger-ca")
    pg = Postgres(tls=(d / "db.crt", d / "db.key"))
    try:
        yield pg, d
    finally:
        pg.close()


def agent(pg, url_tail, node, state):
    cfg = CONFIG + SHIPPING.format(url=pg.url + url_tail)
    return Agent(config=cfg, extra_args=["--state-dir", str(state)], env={"HOSTNAME": node})


def shipped(pg, node) -> int:
    return int(pg.sql(f"SELECT count(*) FROM flatmesh_ledger_records WHERE node = '{node}'")[0][0])


def test_records_ship_over_verified_tls_and_a_wrong_ca_or_plain_tcp_ships_nothing(tls_pg, tmp_path):
    pg, pki = tls_pg
    good = agent(pg, f"?sslmode=verify-full&sslrootcert={pki / 'ca.crt'}", "tls-good", tmp_path / "good")
    strange = agent(pg, f"?sslmode=verify-full&sslrootcert={pki / 'stranger-ca.crt'}", "tls-stranger",
                    tmp_path / "strange")
    plain = agent(pg, "?sslmode=disable", "tls-plain", tmp_path / "plain")
    try:
        for a in (good, strange, plain):
            key = key_for(a, "city-a")
            for _ in range(2):
                client(a, key).completions.create(model=LLM, prompt="Hi", max_tokens=2)
        deadline = time.time() + 20
        while shipped(pg, "tls-good") < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert shipped(pg, "tls-good") == 2
        # The agent's own connections to the server are encrypted.
        ssl = pg.sql("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                     "WHERE a.application_name = 'flatmesh'")
        assert ssl and all(r == ["t"] for r in ssl), ssl
        for a, node in ((strange, "tls-stranger"), (plain, "tls-plain")):
            # The backlog gauge is measured after each (failed) round, once a second here.
            deadline = time.time() + 20
            while metric(a, "flatmesh_ledger_unshipped_records") < 2 and time.time() < deadline:
                time.sleep(0.2)
            assert metric(a, "flatmesh_ledger_unshipped_records") == 2, a.logs()[-2000:]
            assert metric(a, "flatmesh_ledger_ship_errors_total") >= 2
            assert shipped(pg, node) == 0
        assert "certificate" in strange.logs().lower(), strange.logs()[-2000:]
        assert metric(good, "flatmesh_ledger_ship_errors_total") == 0
    finally:
        for a in (good, strange, plain):
            a.stop()


def test_verify_full_without_a_ca_file_or_with_a_client_certificate_is_refused(tmp_path):
    cfg = tmp_path / "flatmesh.toml"
    for tail, said in (("?sslmode=verify-full", "sslmode=verify-full needs sslrootcert"),
                       ("?sslmode=require&sslcert=/c.pem", "sslcert is not supported"),
                       ("?sslmode=verify-ca&sslrootcert=/nonexistent.pem", "cannot read sslrootcert")):
        cfg.write_text(SHIPPING.format(url="postgres://flatmesh:hunter2-secret@db:5432/flatmesh" + tail))
        r = subprocess.run([str(BIN), "config", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and f"ledger.postgres: {said}" in r.stderr, r.stderr
        assert "hunter2" not in r.stdout + r.stderr
