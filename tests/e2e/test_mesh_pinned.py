"""Pinned models in the mesh: one registered pinned gets a copy somewhere without any request,
and when the node holding it is killed it is loaded again on a live node at once (real etcd,
three real agents on loopback)."""
import time

import httpx
import pytest

from conftest import EMBED
from test_mesh import ADMIN, TTL, holders, mesh_config, mesh_of, served_by, wait_until

PINNED = "pinned-embed"
NAMES = ("p1", "p2", "p3")


@pytest.fixture(scope="module")
def trio():
    with mesh_of(NAMES, lambda etcd, name: mesh_config(etcd, name, "/flatmesh-pinned")) as agents:
        yield agents


def test_a_pinned_model_gets_one_copy_in_the_mesh_and_is_replaced_at_once_when_its_node_dies(trio):
    first = trio["p1"]
    wait_until(lambda: len(httpx.get(first.url + "/admin/mesh", headers=ADMIN).json()["nodes"]) == 3, 30,
               "the three nodes never saw each other")
    r = httpx.post(first.url + "/admin/models", headers=ADMIN, timeout=60,
                   json={"id": PINNED, "path": EMBED, "pinned": True})
    assert r.status_code == 201, r.text

    # No request asks for it: the mesh loads it on one node by itself.
    wait_until(lambda: len(holders(first, PINNED)) == 1, 15, lambda: f"holders: {holders(first, PINNED)}")
    time.sleep(2)   # every node's keeper has run since: still one copy, not three
    (holder,) = holders(first, PINNED)
    assert all(holders(a, PINNED) == {holder} for a in trio.values())

    # Kill -9 the holder: a live node loads it again, before any request asks for it.
    survivors = [a for name, a in trio.items() if name != holder]
    trio[holder].proc.kill()
    trio[holder].proc.wait()
    killed = time.monotonic()
    wait_until(lambda: len(holders(survivors[0], PINNED) - {holder}) == 1, 2 * TTL + 5,
               lambda: f"holders seen by a survivor: {holders(survivors[0], PINNED)}")
    took = time.monotonic() - killed
    print(f"the pinned model was ready again on a live node {took:.2f} s after SIGKILL of its holder")
    (again,) = holders(survivors[0], PINNED) - {holder}
    assert again != holder
    time.sleep(2)
    assert holders(survivors[1], PINNED) == {again}, "one copy again, not one per survivor"
    r = httpx.post(survivors[1].url + "/v1/embeddings", timeout=60, json={"model": PINNED, "input": "x"})
    assert r.status_code == 200 and served_by(r) == again, (r.status_code, r.headers, r.text)
