"""The usage ledger: records per request, usage queries, invoices, and durability under kill -9."""
import json
import signal
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
    recorded = {json.loads(l)["id"] for l in (tmp_path / "ledger.jsonl").read_text().splitlines() if l.endswith("}")}
    assert set(completed) <= recorded, f"{len(set(completed) - recorded)} completed responses have no record"
    b = Agent(config=CONFIG, extra_args=["--state-dir", str(tmp_path)])
    try:
        after = httpx.get(f"{b.url}/admin/invoice?to={cutoff}", headers=ADMIN).json()
        assert after == before and before["lines"][0]["requests"] > 0
    finally:
        b.stop()
    a.stop()
