"""The operators' metrics tooling (deploy/prometheus, deploy/grafana) against the real agent.

- The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), and
  the example scrape config passes `promtool check config`.
- The dashboard reads only metric families and labels registered in mesh/src/metrics.rs.
- A real agent (tiers, tenants, a policy plugin, a model that cannot load, a metrics token)
  gets a little traffic, a real Prometheus scrapes it every second with the bearer token, and
  every query of every dashboard panel must parse and return data, except the mesh panels
  listed in MESH_PANELS (no mesh in this test: they must parse). The alert rules are loaded in
  that Prometheus and must evaluate without errors.

Skips when Prometheus (Debian package `prometheus`, installed by ./deploy/setup) is missing.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import EMBED, LLM, ROOT, Agent, free_port, key_for

PROMETHEUS = Path(os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus")
PROMTOOL = Path(os.environ.get("PROMTOOL_BIN") or shutil.which("promtool") or "/usr/bin/promtool")
DASHBOARD = ROOT / "deploy" / "grafana" / "flatmesh.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
METRICS_RS = ROOT / "mesh" / "src" / "metrics.rs"

# Panels that cannot have data on one agent without a mesh: their queries must only parse.
MESH_PANELS = {
    "Forwarded requests/s by peer and result",
    "Forward latency p50 / p95 / p99 by peer",
    "etcd errors/s by node",
    "Placements/s by reason",
    "Ready copies per model in the mesh",
}
# How the dashboard's Grafana variables are replaced in the queries sent to Prometheus.
RATE_INTERVAL = "30s"
RANGE = "5m"

ADMIN = {"authorization": "Bearer admin-secret"}
METRICS_TOKEN = "scrape-secret"
PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
CONFIG = f"""
[server]
admin_token = "admin-secret"
metrics_token = "{METRICS_TOKEN}"

[cache]
preload = false   # so the first requests miss the cache and page their model in

[scheduler]
slots = 1         # one request at a time and no queue: a second request at once is refused
max_queue = 0

[tenancy]
[[tenancy.tiers]]
name = "gold"
weight = 3
token_budget = 100000   # the budget panel and gauge

[[tenancy.tiers]]
name = "basic"
weight = 1
models = ["all-minilm-*"]

[[tenancy.tenants]]
id = "city-a"
tier = "gold"

[[tenancy.tenants]]
id = "city-b"
tier = "basic"

[[models]]
id = "{LLM}"
path = "{LLM}/model.gguf"

[[models]]
id = "{EMBED}"
path = "{EMBED}"

[[models]]
id = "broken"
path = "no-such-model/model.gguf"   # its loads fail: the load-failure panel and alert

[policy.router]
plugin = "{PLUGINS / 'cost_router.wasm'}"
config = {{ alias = "auto", models = ["{LLM}"] }}

[policy.cache]
plugin = "{PLUGINS / 'semantic_cache.wasm'}"
config = {{ embedding_model = "{EMBED}", threshold = 0.95 }}
"""


def need(binary: Path):
    if not binary.exists():
        pytest.skip(f"{binary} is missing: apt-get install prometheus (./deploy/setup installs it)")


# -- the rules and the example config, with promtool ------------------------------------------

def promtool(*args):
    need(PROMTOOL)
    return subprocess.run([str(PROMTOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool_check_and_unit_tests():
    r = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_example_scrape_config_is_valid():
    # --syntax-only: the example names a token file that exists on the Prometheus host only.
    r = promtool("check", "config", "--syntax-only", str(SCRAPE_EXAMPLE.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


# -- the dashboard, read statically -----------------------------------------------------------

def dashboard_panels():
    """Every panel with targets, rows' nested panels included."""
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p.get("targets")]


def exported_metrics():
    """{sample name: its label names} for every family registered in mesh/src/metrics.rs."""
    src = METRICS_RS.read_text()
    found = {}
    for m in re.finditer(r'register_(\w+?)_with_registry!\(\s*"(flatmesh_\w+)",\s*"(?:[^"\\]|\\.)*",\s*(&\[[^\]]*\])?', src):
        kind, name, labels = m.group(1), m.group(2), m.group(3) or ""
        labels = set(re.findall(r'"(\w+)"', labels))
        if "histogram" in kind:
            found[name + "_bucket"] = labels | {"le"}
            found[name + "_sum"] = labels
            found[name + "_count"] = labels
        else:
            found[name] = labels
    assert len(found) > 30, "mesh/src/metrics.rs was not understood"
    return found


def test_dashboard_uses_only_exported_metrics_and_labels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39 and dash["description"]
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[0] == "datasource" and {"model", "tier"} <= set(names)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = exported_metrics()
    titles = set()
    for p in dashboard_panels():
        titles.add(p["title"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            used = set(re.findall(r"\bflatmesh_\w+", expr))
            unknown = used - exported.keys()
            assert not unknown, f"{p['title']}: {sorted(unknown)} not exported by the agent"
            allowed = {"job", "instance"}.union(*(exported[n] for n in used))
            labels = set()
            for sel in re.findall(r"\{([^}]*)\}", expr):
                labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel))
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                labels |= {x.strip() for x in group.split(",") if x.strip()}
            labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            if used:
                assert labels <= allowed, f"{p['title']}: labels {sorted(labels - allowed)} not on {sorted(used)}"
    assert MESH_PANELS <= titles, "MESH_PANELS names panels the dashboard does not have"


# -- a real agent scraped by a real Prometheus ------------------------------------------------

class Prometheus:
    """A real Prometheus on a free loopback port, its data in a temporary directory."""

    def __init__(self, target: str, rule_files=(), ready_timeout: float = 60.0):
        need(PROMETHEUS)
        self.dir = tempfile.TemporaryDirectory(prefix="flatmesh-prometheus-")
        d = Path(self.dir.name)
        # JSON is YAML: the same scrape job as deploy/prometheus/prometheus.yml, every second.
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{
                "job_name": "flatmesh",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials": METRICS_TOKEN},
                "static_configs": [{"targets": [target]}],
            }],
        }
        (d / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(d / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("prometheus did not become ready:\n" + self.logs())
            time.sleep(0.1)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def query(self, expr: str) -> dict:
        """The JSON answer of an instant query now; HTTP 400/422 (a bad query) is returned too."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        return r.json()

    def value(self, expr: str):
        """The first sample's value of an instant query, or None when it has none."""
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_scrapes(self, n: int, timeout: float = 60.0):
        """Wait until `n` more scrapes of the agent have been stored."""
        expr = 'count_over_time(up{job="flatmesh"}[10m])'
        start = self.value(expr) or 0
        deadline = time.time() + timeout
        while (self.value(expr) or 0) < start + n:
            assert time.time() < deadline, "prometheus did not scrape the agent:\n" + self.logs()
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def traffic(agent, gold: str, basic: str, round_: int):
    """A little of everything the dashboard shows, on one agent without a mesh."""
    with httpx.Client(base_url=agent.url, timeout=120) as c:
        g, b = {"authorization": f"Bearer {gold}"}, {"authorization": f"Bearer {basic}"}

        def chat(prompt, max_tokens=4, model=LLM, headers=g):
            return c.post("/v1/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0})

        for text in ("hello", f"round {round_}"):
            r = c.post("/v1/embeddings", headers=b, json={"model": EMBED, "input": text})
            assert r.status_code == 200, r.text
        # The same prompt twice: a miss, then a hit of the response cache.
        for _ in range(2):
            r = chat(f"Say hi, round {round_}")
            assert r.status_code == 200, r.text
        r = chat("Hi", model="auto")  # through the router plugin
        assert r.status_code == 200, r.text
        # 4xx: a tier without the model (403), a model nobody configured (404).
        assert chat("Hi", headers=b).status_code == 403
        assert chat("Hi", model="no-such-model").status_code == 404
        # 5xx: a model whose file is missing fails to load (503).
        assert chat("Hi", model="broken").status_code == 503

    # A rejection: one slot and no queue, so requests sent at once are refused (429).
    statuses = []

    def one(i):
        with httpx.Client(base_url=agent.url, timeout=120) as c:
            statuses.append(c.post("/v1/chat/completions", headers={"authorization": f"Bearer {gold}"}, json={
                "model": LLM, "messages": [{"role": "user", "content": f"Tell a story {round_}.{i}"}],
                "max_tokens": 16, "temperature": 0}).status_code)

    for attempt in range(10):
        threads = [threading.Thread(target=one, args=(attempt * 4 + i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if 429 in statuses:
            break
    assert 429 in statuses and 200 in statuses, statuses

    # An eviction, so that the next round pages the LLM in again (from the warm tier).
    r = httpx.post(f"{agent.url}/admin/models/{LLM}/unload", headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def scraped():
    """(agent, prometheus): the agent has had two rounds of traffic, scraped all along."""
    need(PROMETHEUS)
    agent = Agent(config=CONFIG)
    prom = None
    try:
        prom = Prometheus(agent.url.removeprefix("http://"), rule_files=[ALERTS])
        prom.wait_scrapes(2)
        assert prom.value('up{job="flatmesh"}') == 1, "the scrape with the metrics token failed:\n" + prom.logs()
        gold, basic = key_for(agent, "city-a"), key_for(agent, "city-b")
        for round_ in (1, 2):
            traffic(agent, gold, basic, round_)
            prom.wait_scrapes(3)
        yield agent, prom
    finally:
        if prom is not None:
            prom.stop()
        agent.stop()


def grafana_to_promql(expr: str, variables) -> str:
    """Replace the dashboard's variables as Grafana would with "All" selected."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
    for v in variables:
        expr = expr.replace("${" + v + "}", ".*").replace("$" + v, ".*")
    assert "$" not in expr, f"a variable is left in {expr}"
    return expr


def test_every_dashboard_query_parses_and_returns_data(scraped):
    _, prom = scraped
    dash = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in dash["templating"]["list"] if v["type"] != "datasource"]
    failures, checked = [], 0
    for p in dashboard_panels():
        for t in p["targets"]:
            expr = grafana_to_promql(t["expr"], variables)
            answer = prom.query(expr)
            checked += 1
            if answer.get("status") != "success":
                failures.append(f"{p['title']} [{t['refId']}]: does not parse: {answer.get('error')}\n    {expr}")
            elif p["title"] not in MESH_PANELS and not answer["data"]["result"]:
                failures.append(f"{p['title']} [{t['refId']}]: no data\n    {expr}")
    assert checked > 40
    assert not failures, "\n".join(failures)


def test_dashboard_variables_find_values(scraped):
    """Each `label_values(selector, label)` variable lists what the agent exports."""
    _, prom = scraped
    dash = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in dash["templating"]["list"] if v["type"] != "datasource"]
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {v['name']}: {query}"
        r = httpx.get(f"{prom.url}/api/v1/label/{m.group(2)}/values",
                      params={"match[]": grafana_to_promql(m.group(1), variables)}, timeout=30).json()
        assert r["status"] == "success" and r["data"], f"variable {v['name']}: {r}"
    tiers = httpx.get(f"{prom.url}/api/v1/label/tier/values",
                      params={"match[]": "flatmesh_tier_requests_total"}, timeout=30).json()["data"]
    assert {"gold", "basic"} <= set(tiers)


def test_alert_rules_evaluate_in_prometheus(scraped):
    _, prom = scraped
    deadline = time.time() + 30
    while True:  # every rule evaluated at least once, without an error
        rules = [r for g in httpx.get(prom.url + "/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]
        if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):
            break
        assert time.time() < deadline, rules
        time.sleep(0.5)
    assert {r["name"] for r in rules} >= {"FlatmeshAgentDown", "FlatmeshModelLoadFailing", "FlatmeshHigh5xxRatio",
                                          "FlatmeshEtcdUnreachable", "FlatmeshMeshNodesDropped"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    active = httpx.get(prom.url + "/api/v1/alerts").json()["data"]["alerts"]
    # The model that cannot load is seen at once (pending for its `for:`); the agent is up.
    assert any(a["labels"]["alertname"] == "FlatmeshModelLoadFailing" and a["labels"]["model"] == "broken"
               for a in active), active
    assert not any(a["labels"]["alertname"] in ("FlatmeshAgentDown", "FlatmeshEtcdUnreachable") for a in active), active
