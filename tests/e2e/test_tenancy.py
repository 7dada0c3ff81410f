"""Tenants, tiers and keys: authentication and model rights over HTTP and gRPC."""
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EMBED, LLM, Agent, key_for

ADMIN = {"authorization": "Bearer admin-secret"}
CONFIG = """
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
models = ["all-minilm-*"]

[[tenancy.tenants]]
id = "city-a"
tier = "gold"

[[tenancy.tenants]]
id = "city-b"
tier = "basic"
"""


@pytest.fixture(scope="module")
def tenanted():
    a = Agent(config=CONFIG)
    yield a
    a.stop()


def client(agent, key):
    return openai.OpenAI(base_url=agent.url + "/v1", api_key=key, max_retries=0)


def grpc_embed(agent, key, model=EMBED):
    c = grpcclient.InferenceServerClient(url=agent.grpc)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return c.infer(model, [inp], headers=headers)


def test_admin_needs_its_token(tenanted):
    assert httpx.post(f"{tenanted.url}/admin/tenants/city-a/keys").status_code == 401
    assert httpx.post(f"{tenanted.url}/admin/tenants/nobody/keys", headers=ADMIN).status_code == 404


def test_missing_and_unknown_keys_are_401_on_http_and_grpc(tenanted):
    r = httpx.post(f"{tenanted.url}/v1/embeddings", json={"model": EMBED, "input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(tenanted, "fm-not-a-key").embeddings.create(model=EMBED, input="x")
    assert httpx.get(f"{tenanted.url}/v2/models/{EMBED}").status_code == 401
    # Health and server metadata stay open for probes, on HTTP and gRPC.
    assert httpx.get(f"{tenanted.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{tenanted.url}/v2").status_code == 200
    assert grpcclient.InferenceServerClient(url=tenanted.grpc).is_server_live()
    for key in (None, "fm-not-a-key"):
        with pytest.raises(InferenceServerException) as e:
            grpc_embed(tenanted, key)
        assert "UNAUTHENTICATED" in e.value.status()


def test_a_key_gives_its_tier_and_the_tier_limits_models(tenanted):
    gold, basic = key_for(tenanted, "city-a"), key_for(tenanted, "city-b")
    assert client(tenanted, gold).completions.create(model=LLM, prompt="Hi", max_tokens=2).usage.completion_tokens > 0
    assert len(client(tenanted, basic).embeddings.create(model=EMBED, input="x").data[0].embedding) == 384
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(tenanted, basic).completions.create(model=LLM, prompt="Hi", max_tokens=2)
    assert "basic" in e.value.message
    r = httpx.get(f"{tenanted.url}/v2/models/{LLM}", headers={"authorization": f"Bearer {basic}"})
    assert r.status_code == 403
    assert grpc_embed(tenanted, basic).as_numpy("embedding").shape == (1, 384)
    with pytest.raises(InferenceServerException) as e:
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        grpcclient.InferenceServerClient(url=tenanted.grpc).infer(LLM, [inp], headers={"authorization": f"Bearer {basic}"})
    assert "PERMISSION_DENIED" in e.value.status()


def test_revoked_keys_stop_working(tenanted):
    key = key_for(tenanted, "city-b")
    assert client(tenanted, key).embeddings.create(model=EMBED, input="x")
    assert httpx.post(f"{tenanted.url}/admin/keys/revoke", headers=ADMIN, json={"key": key}).status_code == 204
    with pytest.raises(openai.AuthenticationError):
        client(tenanted, key).embeddings.create(model=EMBED, input="x")
