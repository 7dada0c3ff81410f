"""KServe v2 over gRPC, driven by tritonclient's gRPC client (and raw stubs for ModelMesh headers)."""
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EMBED, LLM


@pytest.fixture(scope="module")
def triton(agent):
    return grpcclient.InferenceServerClient(url=agent.grpc)


def texts(texts):
    inp = grpcclient.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return inp


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata().name == "flatmesh"
    assert triton.is_model_ready(EMBED)
    md = triton.get_model_metadata(EMBED)
    assert [(i.name, i.datatype, list(i.shape)) for i in md.inputs] == [("text", "BYTES", [-1])]
    assert [(o.name, o.datatype, list(o.shape)) for o in md.outputs] == [("embedding", "FP32", [-1, 384])]


def test_model_config_and_statistics(triton):
    cfg = triton.get_model_config(EMBED).config
    assert cfg.name == EMBED and cfg.input[0].name == "text"
    triton.infer(EMBED, [texts(["count"])])
    stats = triton.get_inference_statistics(EMBED).model_stats[0]
    assert stats.inference_stats.success.count >= 1


def test_embedding_infer(triton):
    r = triton.infer(EMBED, [texts(["A man plays guitar.", "Someone makes music.", "Taxes are due."])])
    e = r.as_numpy("embedding")
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_llm_infer_and_streamed_generation(triton):
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"The capital of France is"], dtype=np.object_))
    params = {"max_tokens": 8, "temperature": 0}
    whole = triton.infer(LLM, [inp], parameters=params).as_numpy("text_output")[0].decode()
    assert whole.startswith(" Paris")

    got = queue.Queue()
    triton.start_stream(callback=lambda result, error: got.put((result, error)))
    triton.async_stream_infer(LLM, [inp], parameters=params)
    parts = []
    while True:
        result, error = got.get(timeout=60)
        assert error is None, error
        parts.append(result.as_numpy("text_output")[0].decode())
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    triton.stop_stream()
    assert len(parts) > 2 and "".join(parts) == whole


def test_repository_drives_the_cache(triton):
    triton.unload_model(EMBED)
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert index[EMBED].state == "UNAVAILABLE"
    triton.load_model(EMBED)
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert index[EMBED].state == "READY"


def test_modelmesh_headers_select_the_model(triton):
    r = triton.infer("", [texts(["routed by header"])], headers={"mm-model-id": EMBED})
    assert r.as_numpy("embedding").shape == (1, 384)
    assert r.get_response().model_name == EMBED


def test_errors_have_grpc_status_codes(triton):
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nope", [texts(["x"])])
    assert "NOT_FOUND" in e.value.status()
    bad = grpcclient.InferInput("txt", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        triton.infer(EMBED, [bad])
    assert "INVALID_ARGUMENT" in e.value.status() and "unknown input" in e.value.message()
