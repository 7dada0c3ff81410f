"""KServe v2 / Open Inference Protocol over REST, driven by tritonclient's HTTP client."""
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import EMBED, LLM


@pytest.fixture(scope="module")
def triton(agent):
    return httpclient.InferenceServerClient(url=agent.url.removeprefix("http://"))


def texts_input(texts, binary):
    arr = np.array([t.encode() for t in texts], dtype=np.object_)
    inp = httpclient.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def test_server_health_and_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    md = triton.get_server_metadata()
    assert md["name"] == "flatmesh"
    assert {"binary_tensor_data", "generate", "model_repository"} <= set(md["extensions"])


def test_model_metadata_config_and_readiness(triton):
    assert triton.is_model_ready(EMBED)
    md = triton.get_model_metadata(EMBED)
    assert md["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert md["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    llm = triton.get_model_metadata(LLM)
    assert llm["inputs"][0]["name"] == "text_input" and llm["outputs"][0]["name"] == "text_output"
    cfg = triton.get_model_config(EMBED)
    assert cfg["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize("binary", [False, True])
def test_embedding_infer_json_and_binary(triton, binary):
    out = [httpclient.InferRequestedOutput("embedding", binary_data=binary)]
    r = triton.infer(EMBED, [texts_input(["A man plays guitar.", "Someone makes music.", "Taxes are due."], binary)],
                     outputs=out)
    e = r.as_numpy("embedding")
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_binary_and_json_agree(triton):
    a = triton.infer(EMBED, [texts_input(["same text"], True)]).as_numpy("embedding")
    b = triton.infer(EMBED, [texts_input(["same text"], False)],
                     outputs=[httpclient.InferRequestedOutput("embedding", binary_data=False)]).as_numpy("embedding")
    assert np.allclose(a, b, atol=1e-6)


def test_llm_infer_with_parameters(triton):
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"The capital of France is"], dtype=np.object_))
    r = triton.infer(LLM, [inp], parameters={"max_tokens": 8, "temperature": 0})
    assert r.as_numpy("text_output")[0].decode().startswith(" Paris")


def test_generate_and_generate_stream(agent):
    r = httpx.post(f"{agent.url}/v2/models/{LLM}/generate", timeout=60,
                   json={"text_input": "The capital of France is", "parameters": {"max_tokens": 8, "temperature": 0}})
    assert r.status_code == 200 and r.json()["text_output"].startswith(" Paris")
    with httpx.stream("POST", f"{agent.url}/v2/models/{LLM}/generate_stream", timeout=60,
                      json={"text_input": "The capital of France is", "parameters": {"max_tokens": 8, "temperature": 0}}) as s:
        parts = [json.loads(l[6:])["text_output"] for l in s.iter_lines() if l.startswith("data: ")]
    assert len(parts) > 1 and "".join(parts) == r.json()["text_output"]


def test_ignore_eos_on_v2_generate(agent):
    def generate(**params):
        return httpx.post(f"{agent.url}/v2/models/{LLM}/generate", timeout=60, json={
            "text_input": "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_tokens": 48, "temperature": 0, **params}})
    usage = lambda: httpx.get(f"{agent.url}/admin/ledger/records").json()["records"][-1]["output_tokens"]
    assert generate().status_code == 200 and usage() < 48
    assert generate(ignore_eos=True).status_code == 200 and usage() == 48
    r = generate(ignore_eos="yes")
    assert r.status_code == 400 and "parameters.ignore_eos" in r.json()["error"], r.text


def test_repository_index_load_unload_drive_the_cache(triton, agent):
    names = {m["name"]: m for m in triton.get_model_repository_index()}
    assert names[EMBED]["state"] == "READY"
    triton.unload_model(EMBED)
    assert {m["name"]: m for m in triton.get_model_repository_index()}[EMBED]["state"] == "UNAVAILABLE"
    assert httpx.get(f"{agent.url}/admin/models/{EMBED}").json()["state"] == "cold"
    triton.load_model(EMBED)
    assert httpx.get(f"{agent.url}/admin/models/{EMBED}").json()["state"] == "ready"


def infer_raw(agent, model, body):
    return httpx.post(f"{agent.url}/v2/models/{model}/infer", json=body, timeout=60)


@pytest.mark.parametrize("inputs, expect", [
    ([{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "unknown input \"txt\""),
    ([{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], "must be BYTES"),
    ([{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}], "shape [3]"),
    ([], "missing input \"text\""),
])
def test_bad_inputs_are_400_with_a_clear_message(agent, inputs, expect):
    r = infer_raw(agent, EMBED, {"inputs": inputs})
    assert r.status_code == 400
    assert expect in r.json()["error"]


def test_unknown_model_is_404(triton, agent):
    r = infer_raw(agent, "nope", {"inputs": []})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    with pytest.raises(InferenceServerException):
        triton.get_model_metadata("nope")


def test_statistics(triton):
    triton.infer(EMBED, [texts_input(["count me"], True)])
    stats = triton.get_inference_statistics(EMBED)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1
