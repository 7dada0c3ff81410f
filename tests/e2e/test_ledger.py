"""The usage ledger (SQLite in the state directory): records per request, usage queries,
invoices, durability under kill -9, the import of a JSON-lines ledger, and a corrupt file refused."""
import hashlib
import json
import signal
import sqlite3
import subprocess
import threading
import time

import httpx
import openai
import pytest

import conftest
from conftest import EMBED, LLM, Agent
from test_tenancy import ADMIN, CONFIG, client, key_for


def test_usage_is_recorded_per_tenant_and_tenants_see_only_their_own(tmp_path):
    a = Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)])
    try:
        gold, basic = key_for(a, "city-a"), key_for(a, "city-b")
        for _ in range(3):
            client(a, gold).completions.create(model=LLM, prompt="Hi", max_tokens=3)
        for _ in range(2):
            client(a, basic).embeddings.create(model=EMBED, input="x")
        own = httpx.get(f"{a.url}/v1/usage", headers={"authorization": f"Bearer {basic}"}).json()
        assert [u["tenant"] for u in own["usage"]] == ["city-b"] and own["usage"][0]["requests"] == 2
        every = {u["tenant"]: u for u in httpx.get(f"{a.url}/admin/usage", headers=ADMIN).json()["usage"]}
        assert every["city-a"]["requests"] == 3 and every["city-a"]["output_tokens"] > 0
        inv = httpx.get(f"{a.url}/admin/invoice", headers=ADMIN).json()
        amounts = {l["tenant"]: l["amount"] for l in inv["lines"]}
        assert amounts == {"city-a": 1000, "city-b": 100} and inv["total"] == 1100
        csv = httpx.get(f"{a.url}/admin/invoice?format=csv", headers=ADMIN)
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.text.splitlines()[0] == "tenant,tier,description,amount,requests,input_tokens,output_tokens"
        assert httpx.get(f"{a.url}/admin/usage").status_code == 401
        cli = subprocess.run([str(conftest.BIN), "ledger", "--url", a.url, "--admin-token", "admin-secret",
                              "invoice", "--format", "csv"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and cli.stdout.splitlines()[1].startswith("city-a,gold,\"flat fee, tier gold\",1000.00,3,"), cli
        key = subprocess.run([str(conftest.BIN), "tenants", "--url", a.url, "--admin-token", "admin-secret",
                              "key", "city-b"], capture_output=True, text=True, timeout=30)
        assert json.loads(key.stdout)["key"].startswith("fm-")
    finally:
        a.stop()


def test_kill_9_under_load_loses_no_record_of_a_completed_response(tmp_path):
    a = Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)])
    key = key_for(a, "city-a")
    done, stop = [], threading.Event()

    def load():
        c = openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0, timeout=30)
        while not stop.is_set():
            try:
                done.append(c.completions.create(model=LLM, prompt="Count:", max_tokens=4).id)
            except Exception:
                return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    cutoff = int(time.time()) - 1
    before = httpx.get(f"{a.url}/admin/invoice?to={cutoff}", headers=ADMIN).json()
    time.sleep(1)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    completed = list(done)
    assert len(completed) > 5
    assert not (tmp_path / "ledger.jsonl").exists()
    db = sqlite3.connect(f"file:{tmp_path / 'ledger.sqlite3'}?mode=ro", uri=True)
    recorded = {row[0] for row in db.execute("SELECT id FROM records")}
    db.close()
    assert set(completed) <= recorded, f"{len(set(completed) - recorded)} completed responses have no record"
    b = Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)])
    try:
        after = httpx.get(f"{b.url}/admin/invoice?to={cutoff}", headers=ADMIN).json()
        assert after == before and before["lines"][0]["requests"] > 0
    finally:
        b.stop()
    a.stop()


TENANTS = {"city-a": ("gold", 1000), "city-b": ("basic", 100)}
HOUR = 3_600_000


def old_ledger(path, n):
    """A JSON-lines ledger as agents kept it before SQLite (with a torn last line), over
    three days from 2026-03-01 UTC, and per tenant what its records add up to."""
    start, sums, lines = 1_772_323_200_000, {}, []
    for i in range(n):
        tenant = ["city-a", "city-b"][i % 2]
        rec = {"id": f"cmpl-old-{i}", "tenant": tenant, "tier": TENANTS[tenant][0], "model": LLM,
               "endpoint": "completions", "input_tokens": 3 + i % 11, "output_tokens": i % 23,
               "device_seconds": 0.125, "cache_hit": i % 5 == 0,
               "started_ms": start + i * 997 * 60, "finished_ms": start + i * 997 * 60 + 250}
        if i % 7 == 0:
            rec["client_id"] = f"client-{i}"
        lines.append(json.dumps(rec))
        s = sums.setdefault(tenant, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        for k in ("input_tokens", "output_tokens"):
            s[k] += rec[k]
        s["requests"] += 1
    path.write_text("\n".join(lines) + "\n" + '{"id": "cmpl-torn", "tena')
    return sums


def test_a_jsonl_ledger_is_imported_at_start_with_the_same_invoice(tmp_path):
    sums = old_ledger(tmp_path / "ledger.jsonl", 4000)
    digest = hashlib.sha256((tmp_path / "ledger.jsonl").read_bytes()).hexdigest()
    expected = [{"tenant": t, "tier": tier, "description": f"flat fee, tier {tier}", "amount": price, **sums[t]}
                for t, (tier, price) in TENANTS.items()]
    for restart in range(2):  # the second start imports nothing twice
        a = Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)])
        try:
            inv = httpx.get(f"{a.url}/admin/invoice", headers=ADMIN).json()
            assert inv["lines"] == expected, (restart, inv["lines"])
            assert inv["total"] == 1100
            # A period off the hour bounds sums the same as the records in it.
            frm, to = 1_772_323_200 + 5000, 1_772_323_200 + 2 * 86400 + 77
            got = httpx.get(f"{a.url}/admin/usage", headers=ADMIN, params={"from": frm, "to": to}).json()["usage"]
            rows = [json.loads(l) for l in (tmp_path / "ledger.jsonl").read_text().splitlines()[:-1]]
            inside = [r for r in rows if frm * 1000 <= r["finished_ms"] < to * 1000]
            assert {u["tenant"]: u["requests"] for u in got} == {
                t: sum(r["tenant"] == t for r in inside) for t in TENANTS}
            assert sum(u["output_tokens"] for u in got) == sum(r["output_tokens"] for r in inside)
            if restart == 0:  # a new request lands beside the imported ones
                client(a, key_for(a, "city-b")).embeddings.create(model=EMBED, input="x")
                sums["city-b"]["requests"] += 1
                last = httpx.get(f"{a.url}/admin/ledger/records", headers=ADMIN).json()["records"][-1]
                sums["city-b"]["input_tokens"] += last["input_tokens"]
                sums["city-b"]["output_tokens"] += last["output_tokens"]
                expected[1].update(sums["city-b"])
        finally:
            a.stop()
    assert hashlib.sha256((tmp_path / "ledger.jsonl").read_bytes()).hexdigest() == digest, "the old file is kept"


def test_a_corrupt_ledger_stops_the_agent_at_start_and_is_left_alone(tmp_path):
    (tmp_path / "ledger.sqlite3").write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 40)
    before = (tmp_path / "ledger.sqlite3").read_bytes()
    with pytest.raises(RuntimeError) as e:
        Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)], ready_timeout=60)
    assert "ledger.sqlite3" in str(e.value) and "corrupt" in str(e.value), str(e.value)[-2000:]
    assert (tmp_path / "ledger.sqlite3").read_bytes() == before
