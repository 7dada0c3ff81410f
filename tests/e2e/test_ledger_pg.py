"""The shared ledger: three real agents ("a", "b", "c") in a mesh (one real etcd) ship their
records from their SQLite outboxes to one real PostgreSQL (Debian `postgresql`, initdb'd on a
loopback port for this module). An invoice from any node is the sum of every record; with
PostgreSQL stopped under load (FLATMESH_PG_AWAY_S, 6 s by default; the issue's 20 s with
FLATMESH_PG_AWAY_S=20) no request fails and every record arrives exactly once
after; a node killed with records not shipped ships them when it comes back; a batch shipped
again (the node died between PostgreSQL's commit and marking it shipped) counts once; the hourly
and daily sums that invoices read equal the records' own, after a migration from the first
schema too.
"""
import os
import sqlite3
import subprocess
import threading
import time
import types
from pathlib import Path

import httpx
import pytest

from conftest import BIN, LLM, Agent, Etcd, Postgres, key_for
from test_mesh import mesh_config, wait_until
from test_tenancy import ADMIN

# Two tiers that may both use the LLM (test_tenancy's basic tier may not: it would answer 403
# model_not_allowed); basic has a monthly token budget, so admission there reads the other
# nodes' use from the shared ledger.
TENANTS = f"""
[server]
admin_token = "admin-secret"

[tenancy]
[[tenancy.tiers]]
name = "gold"
price = 1000
weight = 3

[[tenancy.tiers]]
name = "basic"
price = 100
models = ["{LLM}"]
token_budget = 1000000

[[tenancy.tenants]]
id = "city-a"
tier = "gold"

[[tenancy.tenants]]
id = "city-b"
tier = "basic"
"""

NODES = ("a", "b", "c")
TTL = 2.0  # mesh.lease_ttl (test_mesh's config)
# How long PostgreSQL stays away under load: long enough for several failed rounds and a
# backlog on every node (shipping every 200 ms, backoff up to 1 s).
AWAY = float(os.environ.get("FLATMESH_PG_AWAY_S", "6"))
SHIPPING = """
[ledger]
postgres = "{url}"
ship_interval = "200ms"
max_backoff = "1s"
"""


def config(etcd, pg, node):
    # test_mesh's node config with test_tenancy's tiers and tenants, shipping to `pg`.
    mesh = mesh_config(etcd, node, prefix="/flatmesh-e2e-pg").replace('[server]\nadmin_token = "admin-secret"\n', "")
    return TENANTS + mesh + SHIPPING.format(url=pg.url)


def start(m, node):
    a = m.agents[node] = Agent(config=config(m.etcd, m.pg, node), extra_args=["--state-dir", str(m.state[node])])
    # A copy on every node, so that each serves (and records) its own requests rather than
    # forwarding them to the first node that loaded the model.
    r = httpx.post(f"{a.url}/admin/models/{LLM}/load", headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    return a


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    m = types.SimpleNamespace(etcd=None, pg=None, agents={}, keys={})
    m.state = {n: tmp_path_factory.mktemp(f"state-{n}") for n in NODES}
    try:
        m.etcd = Etcd()
        m.pg = Postgres()
        for n in NODES:
            start(m, n)
        m.keys = {"city-a": key_for(m.agents["a"], "city-a"), "city-b": key_for(m.agents["a"], "city-b")}
        # A key made on one node works on every node within a second.
        wait_until(lambda: all(call(a, m.keys["city-a"]) for a in m.agents.values()), 10, "keys on every node")
        yield m
    finally:
        for a in m.agents.values():
            a.stop()
        if m.pg:
            m.pg.close()
        if m.etcd:
            m.etcd.close()


def call(agent, key, timeout=60.0):
    """One completion; its id, or None when it failed."""
    try:
        r = httpx.post(f"{agent.url}/v1/completions", timeout=timeout, headers={"authorization": f"Bearer {key}"},
                       json={"model": LLM, "prompt": "Hi", "max_tokens": 1})
    except httpx.HTTPError:
        return None
    return r.json()["id"] if r.status_code == 200 else None


def metric(agent, name, labels="") -> float:
    for line in httpx.get(agent.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


def local(m, node) -> dict:
    """The node's own records in its SQLite ledger: id → (input, output tokens)."""
    db = sqlite3.connect(f"file:{m.state[node] / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, input_tokens, output_tokens FROM records")}
    finally:
        db.close()


def shared(m, node=None) -> dict:
    """The shared ledger's records (of one node): id → (input, output tokens)."""
    where = f" WHERE node = '{node}'" if node else ""
    rows = m.pg.sql(f"SELECT id, input_tokens, output_tokens FROM flatmesh_ledger_records{where}")
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def all_shipped(m) -> bool:
    return all(local(m, n) == shared(m, n) for n in NODES)


def totals(records: dict):
    return len(records), sum(i for i, _ in records.values()), sum(o for _, o in records.values())


def invoice_totals(agent):
    inv = httpx.get(f"{agent.url}/admin/invoice", headers=ADMIN, timeout=30).json()
    lines = inv["lines"]
    return inv["mesh"]["ledger"], (sum(l["requests"] for l in lines), sum(l["input_tokens"] for l in lines),
                                   sum(l["output_tokens"] for l in lines))


def test_every_node_ships_and_any_invoice_is_the_sum_of_all_records(mesh):
    m = mesh
    done = [call(a, m.keys[t]) for a in m.agents.values() for t in ("city-a", "city-b") for _ in range(2)]
    assert all(done), done
    wait_until(lambda: all_shipped(m), 15, lambda: {n: (len(local(m, n)), len(shared(m, n))) for n in NODES})
    records = shared(m)
    assert set(done) <= set(records)
    assert {n for n in NODES if shared(m, n)} == set(NODES)
    assert m.pg.sql("SELECT max(version) FROM flatmesh_schema_versions") == [["2"]]
    assert_rollups_match(m)
    for a in m.agents.values():
        assert invoice_totals(a) == ("postgres", totals(records))
    usage = httpx.get(f"{m.agents['b'].url}/admin/usage", headers=ADMIN).json()
    assert {u["tenant"]: u["tier"] for u in usage["usage"]} == {"city-a": "gold", "city-b": "basic"}
    assert metric(m.agents["a"], "flatmesh_ledger_shipped_records_total", '{result="new"}') >= 4
    # The tenant's own page, on any node, shows the shared ledger's figures, by day and model too.
    (n,), = m.pg.sql("SELECT count(*) FROM flatmesh_ledger_records WHERE tenant = 'city-b'")
    page = httpx.get(f"{m.agents['c'].url}/pages/tenants/city-b", timeout=30,
                     headers={"authorization": f"Bearer {m.keys['city-b']}"}).text
    assert f'id="requests">{n}<' in page and f'<td>{LLM}</td><td class="n">{n}</td>' in page
    assert "city-a" not in page


def test_postgres_away_under_load_fails_nothing_and_loses_nothing(mesh):
    m = mesh
    m.pg.stop()
    done, failed, stop = [], [], threading.Event()

    def load(agent, key):
        while not stop.is_set():
            rid = call(agent, key)
            (done if rid else failed).append(rid)

    threads = [threading.Thread(target=load, args=(a, m.keys["city-a"])) for a in m.agents.values()]
    for t in threads:
        t.start()
    try:
        time.sleep(AWAY / 2)
        # Invoices still answer while PostgreSQL is away: asked of the nodes instead.
        assert invoice_totals(m.agents["c"])[0] == "nodes"
        time.sleep(AWAY / 2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failed and len(done) >= 3 * AWAY, (len(failed), len(done))
    for a in m.agents.values():
        assert metric(a, "flatmesh_ledger_ship_errors_total") > 0
        assert metric(a, "flatmesh_ledger_unshipped_records") > 0
        assert metric(a, "flatmesh_ledger_ship_lag_seconds") >= AWAY / 2
    m.pg.start()
    wait_until(lambda: all_shipped(m), 20, "every outbox shipped after PostgreSQL came back")
    records = shared(m)
    assert set(done) <= set(records)
    assert len(records) == sum(len(local(m, n)) for n in NODES)  # each once: ids are the key
    wait_until(lambda: all(metric(a, "flatmesh_ledger_unshipped_records") == 0 for a in m.agents.values()), 5,
               "backlog gauges at 0")
    for a in m.agents.values():
        assert invoice_totals(a) == ("postgres", totals(records))


def test_a_node_killed_with_records_not_shipped_ships_them_when_it_returns(mesh):
    m = mesh
    m.pg.stop()
    ids = [call(m.agents["c"], m.keys["city-b"]) for _ in range(5)]
    assert all(ids)
    wait_until(lambda: metric(m.agents["c"], "flatmesh_ledger_unshipped_records") >= 5, 5, "c's backlog")
    m.agents["c"].stop(sig=9)
    m.pg.start()
    time.sleep(TTL + 0.5)  # its lease in etcd runs out
    assert not set(ids) & set(shared(m))
    start(m, "c")
    wait_until(lambda: set(ids) <= set(shared(m)), 10, "the killed node's records shipped")
    assert local(m, "c") == shared(m, "c")


def test_a_batch_shipped_twice_counts_once(mesh):
    m = mesh
    wait_until(lambda: all_shipped(m), 15, "everything shipped")
    before = totals(shared(m))
    mine = len(local(m, "c"))
    # A kill between PostgreSQL's commit and the outbox's mark: the watermark as it was.
    m.agents["c"].stop(sig=9)
    # With c dead, a page on a still counts c's records (from PostgreSQL, not from the nodes).
    (n,), = m.pg.sql("SELECT count(*) FROM flatmesh_ledger_records WHERE tenant = 'city-b' AND node = 'c'")
    assert int(n) >= 5
    (n,), = m.pg.sql("SELECT count(*) FROM flatmesh_ledger_records WHERE tenant = 'city-b'")
    page = httpx.get(f"{m.agents['a'].url}/pages/tenants/city-b", timeout=30,
                     headers={"authorization": f"Bearer {m.keys['city-b']}"}).text
    assert f'id="requests">{n}<' in page and f'<td>{LLM}</td><td class="n">{n}</td>' in page
    assert "unreachable" not in page
    db = sqlite3.connect(m.state["c"] / "ledger.sqlite3")
    with db:
        db.execute("UPDATE meta SET value = 0 WHERE key = 'shipped_seq'")
    db.close()
    time.sleep(TTL + 0.5)
    c = start(m, "c")
    wait_until(lambda: metric(c, "flatmesh_ledger_shipped_records_total", '{result="duplicate"}') == mine, 15,
               lambda: metric(c, "flatmesh_ledger_shipped_records_total", '{result="duplicate"}'))
    assert metric(c, "flatmesh_ledger_shipped_records_total", '{result="new"}') == 0
    assert totals(shared(m)) == before
    assert_rollups_match(m)  # the duplicates added nothing to the sums either
    for a in m.agents.values():
        assert invoice_totals(a) == ("postgres", before)


def test_a_ledger_of_the_first_schema_gets_its_sums_filled_once(mesh):
    """Schema 2 adds the hourly and daily sums that invoices and budgets read: a database
    still at schema 1 (its records there, no sums) gets them filled from its records when a
    node migrates it, while the other nodes keep shipping."""
    m = mesh
    wait_until(lambda: all_shipped(m), 15, "everything shipped")
    m.agents["a"].stop()
    m.pg.sql("DROP TRIGGER flatmesh_ledger_roll_up ON flatmesh_ledger_records;"
             " DROP FUNCTION flatmesh_ledger_roll_up(); DROP TABLE flatmesh_ledger_hours, flatmesh_ledger_origin_days;"
             " DELETE FROM flatmesh_schema_versions WHERE version = 2;")
    # Records shipped to the schema-1 database, with no sums kept.
    assert all(call(m.agents["b"], m.keys["city-b"]) for _ in range(3))
    wait_until(lambda: local(m, "b") == shared(m, "b"), 15, "b shipped to the schema-1 database")
    start(m, "a")  # migrates
    assert m.pg.sql("SELECT max(version) FROM flatmesh_schema_versions") == [["2"]]
    assert all(call(m.agents["c"], m.keys["city-a"]) for _ in range(2))
    wait_until(lambda: all_shipped(m), 15, "everything shipped")
    assert_rollups_match(m)
    records = shared(m)
    for a in m.agents.values():
        assert invoice_totals(a) == ("postgres", totals(records))


def test_a_database_of_a_newer_agent_is_shown_refused_and_shipping_resumes_when_it_is_not(mesh):
    m = mesh
    wait_until(lambda: all_shipped(m), 15, "everything shipped")
    m.agents["a"].stop()
    m.pg.sql("INSERT INTO flatmesh_schema_versions (version) VALUES (99)")
    a = start(m, "a")
    status = lambda: httpx.get(f"{a.url}/status", headers=ADMIN, timeout=10).text
    wait_until(lambda: "refused" in status(), 10, status)
    assert "schema version 99, newer than this agent" in status()
    # It serves and records meanwhile; nothing reaches the newer database.
    ids = [call(a, m.keys["city-a"]) for _ in range(2)]
    assert all(ids) and not set(ids) & set(shared(m))
    m.pg.sql("DELETE FROM flatmesh_schema_versions WHERE version = 99")
    wait_until(lambda: set(ids) <= set(shared(m)), 15, "shipped once the database is not newer")
    wait_until(lambda: "shipping; last round" in status(), 5, status)


def assert_rollups_match(m):
    """The hourly and daily sums equal the same sums taken over the records."""
    hours = ("SELECT hour_ms, tenant, tier, model, requests, input_tokens, output_tokens"
             " FROM flatmesh_ledger_hours ORDER BY 1, 2, 3, 4")
    from_records = ("SELECT (finished_ms / 3600000) * 3600000, tenant, tier, model, count(*), sum(input_tokens),"
                    " sum(output_tokens) FROM flatmesh_ledger_records GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")
    assert m.pg.sql(hours) == m.pg.sql(from_records)
    days = "SELECT day_ms, origin, tenant, tokens FROM flatmesh_ledger_origin_days ORDER BY 1, 2, 3"
    from_records = ("SELECT (finished_ms / 86400000) * 86400000, origin, tenant, sum(input_tokens + output_tokens)"
                    " FROM flatmesh_ledger_records GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    assert m.pg.sql(days) == m.pg.sql(from_records)


def test_the_printed_config_never_shows_the_ledger_password(tmp_path):
    cfg = tmp_path / "flatmesh.toml"
    cfg.write_text(SHIPPING.format(url="postgres://flatmesh:hunter2-secret@db:5432/flatmesh?sslmode=disable"))
    shown = subprocess.run([str(BIN), "config", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert 'postgres = "<set>"' in shown.stdout and "hunter2" not in shown.stdout + shown.stderr
