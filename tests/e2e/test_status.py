"""The operators' status page (`GET /status`) against the real agent: what it shows, and that
it is protected like `/admin`."""
import base64
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import EMBED, LLM, ROOT, Agent, key_for

TOKEN = "status-secret"


@pytest.fixture(scope="module")
def agent():
    a = Agent(config=f'[server]\nadmin_token = "{TOKEN}"\n[cache]\npreload = false\n'
                     '[tenancy]\n[[tenancy.tiers]]\nname = "gold"\nweight = 3\ntoken_budget = 500000\n'
                     '[[tenancy.tenants]]\nid = "city-gold"\ntier = "gold"\n')
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
    assert "<td>gold</td><td>3</td>" in html and "<td>500000</td>" in html


# -- in a real headless browser (Debian chromium-headless-shell, installed by ./deploy/setup) --

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
SCREENSHOT = ROOT / "target" / "status-page.png"


def browse(url: str, *args) -> subprocess.CompletedProcess:
    if not BROWSER:
        pytest.skip("no headless chromium: apt-get install chromium-headless-shell (./deploy/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="flatmesh-chromium-") as profile:
        return subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--hide-scrollbars", *args, url],
            capture_output=True, text=True, timeout=120)


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_browser_shows_the_page_under_traffic_with_page_ins_evictions_and_the_budget(agent):
    admin = {"authorization": f"Bearer {TOKEN}"}
    key = key_for(agent, "city-gold", admin_token=TOKEN)
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            httpx.post(agent.url + "/v1/embeddings", headers={"authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": EMBED, "input": ["status page traffic"] * 4})

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        # A page-in and an eviction to show: the LLM is loaded, then unloaded by the operator.
        assert httpx.post(agent.url + f"/admin/models/{LLM}/load", headers=admin, timeout=120).status_code == 200
        assert httpx.post(agent.url + f"/admin/models/{LLM}/unload", headers=admin, timeout=120).status_code == 200
        time.sleep(1)
        # The page the browser renders (Basic auth in the URL, as an operator's bookmark would).
        url = agent.url.replace("http://", f"http://ops:{TOKEN}@") + "/status"
        dom = browse(url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        shot = browse(url, f"--screenshot={SCREENSHOT}", "--window-size=1280,1600")
        assert shot.returncode == 0 and SCREENSHOT.exists(), shot.stderr[-2000:]
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert png_size(SCREENSHOT) == (1280, 1600) and SCREENSHOT.stat().st_size > 20_000
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    text = re.sub(r"\s+", " ", text)
    assert "Recent page-ins and evictions" in text
    assert re.search(rf"unloaded {re.escape(LLM)} copy-\d+ host0 admin after \d+ s", text), text
    assert re.search(rf"page-in {re.escape(EMBED)} copy-\d+ host0 from (disk|warm) in [\d.]+ s", text), text
    # The gold tier: its tenant's use against the budget, with a bar.
    row = re.search(r"<tr><td>gold</td>.*?</tr>", dom.stdout, re.S).group(0)
    used = int(re.search(r"</div></div> (\d+)</td>", row).group(1))
    assert used > 0 and 'class="bar"' in row
    # Models with their state, the device bar: rendered, not only sent.
    assert f"{EMBED} ready" in text and "host0" in text
