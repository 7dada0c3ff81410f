"""The operators' status page (`GET /status`) against the real agent: what it shows, and that
it is protected like `/admin`."""
import base64

import httpx
import pytest

from conftest import EMBED, LLM, Agent

TOKEN = "status-secret"


@pytest.fixture(scope="module")
def agent():
    a = Agent(config=f'[server]\nadmin_token = "{TOKEN}"\n[cache]\npreload = false\n'
                     '[tenancy]\n[[tenancy.tiers]]\nname = "gold"\nweight = 3\ntoken_budget = 5000\n')
    yield a
    a.stop()


def test_the_page_needs_the_admin_token_as_bearer_or_basic_password(agent):
    r = httpx.get(agent.url + "/status")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(agent.url + "/status", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(agent.url + "/status", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    assert httpx.get(agent.url + "/status", headers={"authorization": f"Basic {basic}"}).status_code == 200


def test_the_page_shows_devices_models_copies_and_tiers(agent):
    admin = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(agent.url + f"/admin/models/{EMBED}/load", headers=admin, timeout=120).status_code == 200
    html = httpx.get(agent.url + "/status", headers=admin).text
    assert html.startswith("<!doctype html>") and 'http-equiv="refresh"' in html
    assert "<script" not in html
    assert f"<td>{EMBED}</td>" in html and f"<td>{LLM}</td>" in html
    assert '<td class="ready">ready</td>' in html and '<td class="cold">cold</td>' in html
    assert 'class="bar"' in html and "host0" in html
    assert "<td>gold</td><td>3</td>" in html and "<td>5000</td>" in html
