"""Admin: bearer-token auth, status, hot release swap under load, refused releases."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.app import BackgroundServer
from server.client import ParityClient, ParityRpcError


@pytest.mark.parametrize("header", [None, "Bearer wrong", "{token}", "Basic {token}"], ids=["no token", "wrong token", "no scheme", "wrong scheme"])
def test_admin_refuses_calls_without_the_right_bearer_token(memory_server, header, admin_token):
    metadata = None if header is None else [("authorization", header.format(token=admin_token))]
    with grpc.insecure_channel(f"127.0.0.1:{memory_server.port}") as ch:
        stub = pb_grpc.AdminStub(ch)
        for call, req in ((stub.GetStatus, pb.GetStatusRequest()), (stub.LoadRelease, pb.LoadReleaseRequest(path="/tmp"))):
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=5, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_status_with_the_token(client, release_dir):
    st = client.status()
    assert st.release_id == release_dir.name and st.serving and st.store == "memory"
    assert st.clock == "data" and st.catalogue_items == 60
    assert set(st.feature_set_versions) == {"user_activity", "item_popularity", "user_topic", "user_creator"}


def test_admin_is_disabled_without_a_configured_token(release_dir, small_sim, server_config):
    with BackgroundServer(server_config(release_dir, small_sim, admin_token=None)) as s, ParityClient(f"127.0.0.1:{s.port}", admin_token="anything") as c:
        with pytest.raises(ParityRpcError) as e:
            c.status()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "disabled" in e.value.details


@pytest.fixture(scope="module")
def releases_root(tmp_path_factory) -> Path:
    """LoadRelease loads only under the server's releases root: this module's copies go here."""
    return tmp_path_factory.mktemp("admin-releases")


@pytest.fixture(scope="module")
def memory_server(release_dir, small_sim, server_config, releases_root, free_port):
    with BackgroundServer(server_config(release_dir, small_sim, metrics_port=free_port(), releases_root=releases_root)) as s:
        yield s


@pytest.fixture
def tmp_path(releases_root, request) -> Path:  # noqa: F811 - this module's tests place releases under the root
    import uuid

    p = releases_root / f"{request.node.name[:30]}-{uuid.uuid4().hex[:6]}"
    p.mkdir()
    return p


def _refused(client, path, code, words):
    with pytest.raises(ParityRpcError) as e:
        client.load_release(str(path))
    assert e.value.code == code, e.value
    assert words in e.value.details, e.value.details


def test_broken_and_incompatible_releases_are_refused_and_serving_goes_on(client, release_dir, tmp_path, writable_copy):
    corrupt = writable_copy(release_dir, tmp_path / "corrupt")
    with open(corrupt / "rankers" / "student_int8.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    _refused(client, corrupt, grpc.StatusCode.FAILED_PRECONDITION, "sha256")

    partial = writable_copy(release_dir, tmp_path / "partial")
    (partial / "manifest.json").unlink()
    _refused(client, partial, grpc.StatusCode.FAILED_PRECONDITION, "manifest.json")

    _refused(client, tmp_path / "nowhere", grpc.StatusCode.FAILED_PRECONDITION, "no such folder")
    _refused(client, "", grpc.StatusCode.INVALID_ARGUMENT, "path")

    skewed = writable_copy(release_dir, tmp_path / "skewed")
    m = json.loads((skewed / "manifest.json").read_text())
    m["feature_sets"]["user_activity"]["version"] = "v000000000000"
    (skewed / "manifest.json").write_text(json.dumps(m))
    _refused(client, skewed, grpc.StatusCode.FAILED_PRECONDITION, "feature-set versions this server cannot serve")

    assert client.status().release_id == release_dir.name
    assert len(client.recommend(4, k=5).items) == 5


def test_hot_swap_under_concurrent_requests_fails_no_request(memory_server, client, release_dir, tmp_path, writable_copy):
    other = writable_copy(release_dir, tmp_path / "again")  # same release, another folder: a real reload
    back = writable_copy(release_dir, tmp_path / "back")
    stop = threading.Event()
    failures, served, releases = [], [0], set()

    def load(i: int) -> None:
        with ParityClient(f"127.0.0.1:{memory_server.port}", timeout_s=5.0, retries=0) as c:
            u = 0
            while not stop.is_set():
                u = (u + 1) % 150
                try:
                    r = c.recommend(u + 1000 * i, k=10, exclude=[str(u % 60)])
                    releases.add(r.release_id)
                    served[0] += 1
                    if len(r.items) != 10:
                        failures.append(f"{len(r.items)} items")
                except ParityRpcError as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for path in (other, back, other, back):
            loaded = client.load_release(str(path))
            assert loaded.release_id == release_dir.name and loaded.load_ms > 0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures[:5]
    assert served[0] > 20
    assert memory_server.service.state.current.runtime.release.path == Path(back)


def test_load_release_only_loads_under_the_releases_root(client, release_dir, tmp_path_factory, writable_copy, releases_root):
    outside = writable_copy(release_dir, tmp_path_factory.mktemp("elsewhere") / "r")
    _refused(client, outside, grpc.StatusCode.PERMISSION_DENIED, "outside the releases root")
    _refused(client, "../../../../etc", grpc.StatusCode.PERMISSION_DENIED, "outside the releases root")
    link = releases_root / f"link-{outside.parent.name}"
    link.symlink_to(outside)  # a link inside the root to a release outside it
    _refused(client, str(link), grpc.StatusCode.PERMISSION_DENIED, "outside the releases root")
    _refused(client, "/" + "a" * 4096, grpc.StatusCode.INVALID_ARGUMENT, "limit is 1024")
    _refused(client, "x\x00y", grpc.StatusCode.INVALID_ARGUMENT, "NUL")
    assert len(client.recommend(4, k=5).items) == 5


@pytest.mark.parametrize("field,value", [("files", "x"), ("feature_sets", []), ("ranker_inputs", 7), ("release_id", {"a": 1})])
def test_a_manifest_with_wrong_typed_fields_is_failed_precondition_not_internal(client, release_dir, tmp_path, writable_copy, field, value):
    bad = writable_copy(release_dir, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    m[field] = value
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ParityRpcError) as e:
        client.load_release(str(bad))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert client.status().release_id == release_dir.name


def test_a_release_load_without_a_client_deadline_is_not_cut_by_the_request_deadline_cap(release_dir, small_sim, server_config, releases_root,
                                                                                         writable_copy, admin_token):
    copy = writable_copy(release_dir, releases_root / "nodeadline")
    # Requests get 5 ms at most here; a release load takes longer and carries no client deadline.
    cfg = server_config(release_dir, small_sim, releases_root=releases_root, default_deadline_s=0.005, max_deadline_s=0.005)
    with BackgroundServer(cfg) as s, grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        r = pb_grpc.AdminStub(ch).LoadRelease(pb.LoadReleaseRequest(path=str(copy)), metadata=[("authorization", f"Bearer {admin_token}")])
        assert r.release_id == release_dir.name and r.load_ms > 5
