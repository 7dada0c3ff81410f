"""The tenant pages and the model comparison page (`/pages/*`, `/status/tenants`) against the
real agent, over plain HTTP: a tenant's page opens with its own key only and shows its own
figures (equal to the ledger's), never another tenant's; the operators' view needs the admin
token; the comparison page sends one prompt to two models the tier may use through the serve
path, and both answers are recorded in the ledger like any request.

The last test does it all again in a real browser (headless Chromium over the DevTools
protocol): signing in with the form, the cookie, the figures as rendered, the comparison form.
"""
import re
import sqlite3
from pathlib import Path

import httpx
import pytest

from cdp import BROWSER, Browser
from conftest import BIN, LLM, Agent, key_for

ADMIN = {"authorization": "Bearer admin-secret"}
TWIN = "smollm2-twin"  # the same weights under a second id: a second chat model to compare
HELD_BACK = "smollm2-held-back"  # a chat model the basic tier may not use

CONFIG = f"""
[server]
admin_token = "admin-secret"

[cache]
preload = false

[[models]]
id = "{LLM}"
path = "{LLM}/model.gguf"

[[models]]
id = "{TWIN}"
path = "{LLM}/model.gguf"

[[models]]
id = "{HELD_BACK}"
path = "{LLM}/model.gguf"

[tenancy]
[[tenancy.tiers]]
name = "gold"
price = 1000
token_budget = 500000
models = ["{LLM}", "{TWIN}"]

[[tenancy.tiers]]
name = "basic"
price = 100
token_budget = 900000
models = ["{LLM}"]

[[tenancy.tenants]]
id = "city-gold"
tier = "gold"

[[tenancy.tenants]]
id = "city-basic"
tier = "basic"
"""


@pytest.fixture(scope="module")
def site():
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    a = Agent(config=CONFIG)
    try:
        a.keys = {t: key_for(a, t) for t in ("city-gold", "city-basic")}
        for tenant, n in (("city-gold", 2), ("city-basic", 1)):
            for _ in range(n):
                r = httpx.post(f"{a.url}/v1/completions", timeout=120, headers=bearer(a.keys[tenant]),
                               json={"model": LLM, "prompt": "Hello", "max_tokens": 3})
                assert r.status_code == 200, r.text
        yield a
    finally:
        a.stop()


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def cell(html: str, id_: str) -> str:
    m = re.search(rf'id="{id_}"[^>]*>([^<]*)<', html)
    assert m, f"no #{id_} in the page"
    return m.group(1)


def usage_of(agent, tenant) -> dict:
    usage = httpx.get(f"{agent.url}/admin/usage", headers=ADMIN, timeout=30).json()["usage"]
    return next(u for u in usage if u["tenant"] == tenant)


def ledger(agent, sql: str, *args) -> list:
    """Rows of a query on the agent's ledger (its SQLite file, read-only)."""
    db = sqlite3.connect(f"file:{Path(agent.dir.name) / 'state' / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def records(agent) -> dict:
    """The agent's ledger: id → (tenant, model)."""
    return {r[0]: (r[1], r[2]) for r in ledger(agent, "SELECT id, tenant, model FROM records")}


def test_a_tenant_page_shows_its_own_figures_and_never_another_tenants(site):
    a = site
    html = httpx.get(f"{a.url}/pages/tenants/city-gold", headers=bearer(a.keys["city-gold"]), timeout=30)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "script-src" not in html.headers["content-security-policy"]  # default-src 'none': no scripts
    html = html.text
    u = usage_of(a, "city-gold")
    assert u["requests"] == 2
    assert int(cell(html, "requests")) == u["requests"]
    assert int(cell(html, "input-tokens")) == u["input_tokens"]
    assert int(cell(html, "output-tokens")) == u["output_tokens"]
    assert int(cell(html, "budget-left")) == 500000 - u["input_tokens"] - u["output_tokens"]
    assert cell(html, "invoice-total") == "1000.00"
    assert f"<td>{LLM}</td>" in html  # the usage by day and model
    # Nothing of the other tenant: not its name, its tier, its key; nor any key at all.
    for other in ("city-basic", "basic", a.keys["city-basic"], a.keys["city-gold"], "900000"):
        assert other not in html, other
    # Another tenant's key opens its own page, not this one.
    r = httpx.get(f"{a.url}/pages/tenants/city-gold", headers=bearer(a.keys["city-basic"]), timeout=30)
    assert r.status_code == 403 and "another tenant" in r.text and "city-basic" not in r.text
    basic = httpx.get(f"{a.url}/pages/tenants/city-basic", headers=bearer(a.keys["city-basic"]), timeout=30).text
    assert int(cell(basic, "requests")) == usage_of(a, "city-basic")["requests"] == 1
    assert "city-gold" not in basic and cell(basic, "invoice-total") == "100.00"


def test_a_missing_or_wrong_key_gets_the_sign_in_page_and_a_good_one_a_cookie(site):
    a = site
    for headers in ({}, bearer("fm-not-a-key"), {"cookie": "flatmesh_key=fm-not-a-key"}):
        r = httpx.get(f"{a.url}/pages/tenants/city-gold", headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer") and 'action="/pages/login"' in r.text
        assert 'id="requests"' not in r.text
    # The admin token is no tenant's key.
    assert httpx.get(f"{a.url}/pages/tenants/city-gold", headers=ADMIN, timeout=30).status_code == 401
    # Signing in with the form sets an HttpOnly cookie scoped to the pages.
    r = httpx.post(f"{a.url}/pages/login", data={"key": a.keys["city-gold"]}, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/pages/tenants/city-gold"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/pages" in cookie
    jar = {"cookie": cookie.split(";")[0]}
    assert httpx.get(f"{a.url}/pages/tenants/city-gold", headers=jar, timeout=30).status_code == 200
    assert httpx.get(f"{a.url}/pages/tenants/city-basic", headers=jar, timeout=30).status_code == 403
    r = httpx.post(f"{a.url}/pages/login", data={"key": "fm-not-a-key"}, timeout=30)
    assert r.status_code == 401 and "set-cookie" not in r.headers


def test_the_operators_view_over_all_tenants_needs_the_admin_token(site):
    a = site
    for headers in ({}, bearer(a.keys["city-gold"]), bearer("wrong")):
        assert httpx.get(f"{a.url}/status/tenants", headers=headers, timeout=30).status_code == 401
        assert httpx.get(f"{a.url}/status/tenants/city-gold", headers=headers, timeout=30).status_code == 401
    html = httpx.get(f"{a.url}/status/tenants", headers=ADMIN, timeout=30).text
    assert 'data-tenant="city-gold"' in html and 'data-tenant="city-basic"' in html
    assert cell(html, "invoice-total") == "1100.00"
    one = httpx.get(f"{a.url}/status/tenants/city-basic", headers=ADMIN, timeout=30).text
    assert int(cell(one, "requests")) == usage_of(a, "city-basic")["requests"]
    assert httpx.get(f"{a.url}/status/tenants/nobody", headers=ADMIN, timeout=30).status_code == 404
    assert 'href="/status/tenants"' in httpx.get(f"{a.url}/status", headers=ADMIN, timeout=30).text


def test_compare_sends_one_prompt_to_two_models_through_the_serve_path(site):
    a = site
    gold = bearer(a.keys["city-gold"])
    form = httpx.get(f"{a.url}/pages/compare", headers=gold, timeout=30).text
    offered = set(re.findall(r'name="model" value="([^"]+)"', form))
    assert offered == {LLM, TWIN}  # what the tier may use, not HELD_BACK
    basic = httpx.get(f"{a.url}/pages/compare", headers=bearer(a.keys["city-basic"]), timeout=30).text
    assert set(re.findall(r'name="model" value="([^"]+)"', basic)) == {LLM}
    assert httpx.get(f"{a.url}/pages/compare", timeout=30).status_code == 401
    # A field at fault is named.
    r = httpx.post(f"{a.url}/pages/compare", headers=gold, data={"prompt": "Hi", "model": LLM, "max_tokens": "0"})
    assert r.status_code == 400 and "max_tokens" in r.text

    before = usage_of(a, "city-gold")
    r = httpx.post(f"{a.url}/pages/compare", headers=gold, timeout=300,
                   data={"prompt": "Name a colour.", "model": [LLM, TWIN], "max_tokens": "4"})
    assert r.status_code == 200, r.text
    html = r.text
    assert 'class="error failure"' not in html
    ids = re.findall(r'<code class="id">([^<]+)</code>', html)
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(m in html for m in (f'data-model="{LLM}"', f'data-model="{TWIN}"'))
    outputs = [int(x) for x in re.findall(r'class="n output-tokens">(\d+)<', html)]
    assert len(outputs) == 2 and all(1 <= n <= 4 for n in outputs)
    # Recorded like any request: in the ledger, as this tenant's, one per model.
    rec = records(a)
    assert sorted(rec[i] for i in ids) == sorted([("city-gold", LLM), ("city-gold", TWIN)])
    after = usage_of(a, "city-gold")
    assert after["requests"] == before["requests"] + 2
    assert after["output_tokens"] == before["output_tokens"] + sum(outputs)
    # A model the tier may not use is refused through the same path, and not recorded.
    r = httpx.post(f"{a.url}/pages/compare", headers=bearer(a.keys["city-basic"]), timeout=300,
                   data={"prompt": "Hi", "model": TWIN, "max_tokens": "2"})
    assert r.status_code == 200 and "model_not_allowed" in r.text
    assert usage_of(a, "city-basic")["requests"] == 1
    page = httpx.get(f"{a.url}/pages/tenants/city-gold", headers=gold, timeout=30).text
    assert f"<td>{TWIN}</td>" in page


def ledger_sums(agent, tenant) -> tuple:
    """(requests, input tokens, output tokens) of a tenant, straight from the ledger's database."""
    return ledger(agent, "SELECT COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM records "
                  "WHERE tenant = ?", tenant)[0]


@pytest.mark.skipif(not BROWSER, reason="no headless chromium: ./deploy/setup installs chromium-headless-shell")
def test_in_a_browser_a_tenant_signs_in_sees_its_own_figures_and_compares_two_models(site):
    a = site
    with Browser() as b:
        # Not signed in: the page is the sign-in form. The key goes in, the form is sent.
        b.open(f"{a.url}/pages/tenants/city-gold")
        assert b.eval("!!document.querySelector('form[action=\"/pages/login\"] #key')")
        assert b.eval("document.querySelector('#requests')") is None
        b.run(f"document.querySelector('#key').value = {a.keys['city-gold']!r}; document.forms[0].submit()")
        b.wait_for("location.pathname == '/pages/tenants/city-gold' && document.querySelector('#requests')")
        # The figures as the browser renders them are the database's.
        requests, tokens_in, tokens_out = ledger_sums(a, "city-gold")
        assert int(b.text("#requests")) == requests
        assert int(b.text("#input-tokens")) == tokens_in
        assert int(b.text("#output-tokens")) == tokens_out
        assert int(b.text("#budget-left")) == 500000 - tokens_in - tokens_out
        assert b.text("#invoice-total") == "1000.00"
        assert "city-basic" not in b.html()
        # The cookie is this tenant's: another tenant's page stays shut.
        b.open(f"{a.url}/pages/tenants/city-basic")
        assert "another tenant" in b.eval("document.body.innerText")
        assert b.eval("document.querySelector('#requests')") is None and "900000" not in b.html()
        # The comparison form: the tier's two models ticked, one prompt, both answers rendered.
        b.open(f"{a.url}/pages/compare")
        offered = b.eval("[...document.querySelectorAll('input[name=model]')].map(e => e.value).sort()")
        assert offered == sorted([LLM, TWIN])
        b.run("document.querySelector('#prompt').value = 'Name a colour.';"
              "document.querySelector('#max_tokens').value = '3';"
              "document.querySelectorAll('input[name=model]').forEach(e => e.checked = true);"
              "document.forms[0].submit()")
        b.wait_for("document.querySelectorAll('.answer').length == 2")
        assert b.eval("document.querySelectorAll('.failure').length") == 0
        ids = b.eval("[...document.querySelectorAll('code.id')].map(e => e.textContent)")
        outputs = b.eval("[...document.querySelectorAll('.output-tokens')].map(e => +e.textContent)")
    assert len(set(ids)) == 2 and all(1 <= n <= 3 for n in outputs)
    rec = records(a)
    assert sorted(rec[i] for i in ids) == sorted([("city-gold", LLM), ("city-gold", TWIN)])
    assert ledger_sums(a, "city-gold")[0] == requests + 2
