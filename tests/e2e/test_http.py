"""HTTP/REST v2 end to end: tritonclient.http (sync, async, aio), raw requests and hostile ones
against a real server on loopback (docs/protocol.md#httprest).

Every answer that has a gRPC twin is compared with what the gRPC front end gives for the same
request, so the two front ends cannot drift apart.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import socket
import time
import zlib
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
import tritonclient.utils.shared_memory as shm
from e2e_support import MODEL_REPOSITORY
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

LIMIT = 1 << 20  # --http-max-input-size for the hostile-input server


@pytest.fixture(scope="module")
def served(server_factory):
    """model_repository/ with client shared memory on and a 1 MiB body limit."""
    return server_factory(
        MODEL_REPOSITORY, "--allow-client-shm=true", f"--http-max-input-size={LIMIT}"
    )


@pytest.fixture(scope="module")
def hc(served):
    client = httpclient.InferenceServerClient(served.http_url, concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gc(served):
    client = grpcclient.InferenceServerClient(served.url)
    yield client
    client.close()


def post(
    server: Any,
    path: str,
    body: bytes = b"",
    headers: dict[str, Any] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes]:
    """One raw request; (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def error_of(status_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = status_body
    assert headers["content-type"].startswith("application/json"), headers
    return status, json.loads(body)["error"]


def simple_inputs(binary: bool, a: np.ndarray, b: np.ndarray) -> list[Any]:
    inputs = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        tensor = httpclient.InferInput(name, list(arr.shape), "INT32")
        tensor.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(tensor)
    return inputs


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


# -- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_binary_and_json(hc, binary_in: bool, binary_out: bool) -> None:
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary_out)
        for name in ("OUTPUT0", "OUTPUT1")
    ]
    result = hc.infer("simple", simple_inputs(binary_in, A, B), outputs=outputs, request_id="r1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    response = result.get_response()
    assert response["id"] == "r1" and response["model_version"] == "1"
    for out in response["outputs"]:
        assert ("data" in out) is not binary_out
        assert (out.get("parameters", {}).get("binary_data_size") == 64) is binary_out


def test_raw_json_infer_without_client_library(served) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [[1] * 16]},
        ],
        "outputs": [{"name": "OUTPUT0"}],
    }
    status, headers, data = post(served, "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 200, data
    assert headers["content-type"] == "application/json"
    reply = json.loads(data)
    assert reply["outputs"] == [
        {
            "name": "OUTPUT0",
            "datatype": "INT32",
            "shape": [1, 16],
            "data": [i + 1 for i in range(16)],
        }
    ]


def test_async_infer(hc) -> None:
    pending = [hc.async_infer("simple", simple_inputs(True, A + i, B)) for i in range(8)]
    for i, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result().as_numpy("OUTPUT0"), A + i + B)


def test_aio_client(served) -> None:
    async def run() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(served.http_url) as client:
            assert await client.is_server_ready()
            results = await asyncio.gather(
                *(client.infer("simple", simple_inputs(i % 2 == 0, A + i, B)) for i in range(6))
            )
            return [r.as_numpy("OUTPUT1") for r in results]

    for i, out in enumerate(asyncio.run(run())):
        np.testing.assert_array_equal(out, A + i - B)


@pytest.mark.parametrize("binary", [True, False])
def test_strings(hc, binary: bool) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    inputs = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        tensor = httpclient.InferInput(name, [1, 16], "BYTES")
        tensor.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    result = hc.infer("simple_string", inputs, outputs=outputs)
    got = [
        bytes(v) if not isinstance(v, str) else v.encode() for v in result.as_numpy("OUTPUT0")[0]
    ]
    assert got == [str(i + 1).encode() for i in range(16)]


def test_classification_matches_grpc(hc, gc) -> None:
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False, class_count=3)
    result = hc.infer("simple", simple_inputs(True, A, B), outputs=[out])
    twin = gc.infer(
        "simple",
        [
            grpcclient.InferInput(n, [1, 16], "INT32").set_data_from_numpy(x)
            for n, x in (("INPUT0", A), ("INPUT1", B))
        ],
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)],
    )
    expected = [v.decode() for v in twin.as_numpy("OUTPUT0").reshape(-1)]
    got = [v if isinstance(v, str) else v.decode() for v in result.as_numpy("OUTPUT0").reshape(-1)]
    assert got == expected == ["18:15", "17:14", "16:13"]


@pytest.mark.parametrize(
    ("request_alg", "response_alg"), [("gzip", "deflate"), ("deflate", "gzip")]
)
def test_compression_both_ways(hc, request_alg: str, response_alg: str) -> None:
    result = hc.infer(
        "simple",
        simple_inputs(True, A, B),
        request_compression_algorithm=request_alg,
        response_compression_algorithm=response_alg,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)


def test_response_is_compressed_only_when_asked(served) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    status, headers, data = post(
        served,
        "/v2/models/simple/infer",
        gzip.compress(body),
        {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(data))["outputs"][0]["data"] == [2] * 16
    status, headers, data = post(served, "/v2/models/simple/infer", body)
    assert status == 200 and "content-encoding" not in headers
    assert json.loads(data)["outputs"][1]["data"] == [0] * 16


# -- health, metadata, config, statistics, repository ----------------------------------------


def test_health_and_metadata_match_grpc(hc, gc) -> None:
    assert hc.is_server_live() and hc.is_server_ready()
    assert hc.is_model_ready("simple") and hc.is_model_ready("simple", "1")
    assert not hc.is_model_ready("simple", "7") and not hc.is_model_ready("no_such_model")
    server = hc.get_server_metadata()
    twin = gc.get_server_metadata(as_json=True)
    assert server == {k: twin[k] for k in ("name", "version", "extensions")}
    assert "system_shared_memory" in server["extensions"]
    twin = gc.get_model_metadata("simple", as_json=True)
    for tensor in twin["inputs"] + twin["outputs"]:  # protobuf's JSON quotes int64
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    assert hc.get_model_metadata("simple") == twin
    assert hc.get_model_metadata("simple", "1")["versions"] == ["1"]


def test_config_and_statistics_use_json_numbers(hc) -> None:
    config = hc.get_model_config("simple")
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [16]
    hc.infer("simple", simple_inputs(True, A, B))
    stats = hc.get_inference_statistics("simple")["model_stats"][0]
    assert stats["name"] == "simple" and stats["version"] == "1"
    assert isinstance(stats["inference_count"], int) and stats["inference_count"] >= 1
    assert isinstance(stats["inference_stats"]["success"]["ns"], int)
    assert stats["inference_stats"]["success"]["ns"] > 0
    everything = hc.get_inference_statistics()["model_stats"]
    assert {"simple", "simple_string"} <= {s["name"] for s in everything}


def test_repository_index(hc, gc) -> None:
    index = hc.get_model_repository_index()
    twin = gc.get_model_repository_index(as_json=True)["models"]
    assert sorted(m["name"] for m in index) == sorted(m["name"] for m in twin)
    assert {"name": "simple", "version": "1", "state": "READY"} in index


def test_model_control_over_http(server_factory, tmp_path) -> None:
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, repo)
    server = server_factory(repo, "--model-control-mode=explicit")
    client = httpclient.InferenceServerClient(server.http_url)
    assert not client.is_model_ready("simple")
    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert client.get_model_config("simple")["max_batch_size"] == 16
    client.unload_model("simple")
    assert not client.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("wrong_model_name")
    assert info.value.status() == "500"  # Triton's INTERNAL for a failed poll
    assert "failed to load 'wrong_model_name'" in info.value.message()
    status, message = error_of(
        post(
            server,
            "/v2/repository/models/simple/load",
            json.dumps({"parameters": {"file:1/model.onnx": "%%% not base64"}}).encode(),
        )
    )
    assert status == 400 and "not valid base64" in message
    client.close()
    assert server.terminate() == 0


# -- shared memory --------------------------------------------------------------------------------


def test_system_shared_memory_over_http(hc) -> None:
    size = A.nbytes
    regions = {}
    try:
        for name in ("http_in0", "http_in1", "http_out0"):
            regions[name] = shm.create_shared_memory_region(name, f"/{name}", size)
        shm.set_shared_memory_region(regions["http_in0"], [A])
        shm.set_shared_memory_region(regions["http_in1"], [B])
        for name in regions:
            hc.register_system_shared_memory(name, f"/{name}", size)
        status = hc.get_system_shared_memory_status()
        assert {"name": "http_in0", "key": "/http_in0", "offset": 0, "byte_size": size} in status
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 16], "INT32")
            tensor.set_shared_memory(f"http_in{name[-1]}", size)
            inputs.append(tensor)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        out.set_shared_memory("http_out0", size)
        result = hc.infer("simple", inputs, outputs=[out])
        entry = result.get_output("OUTPUT0")
        assert "data" not in entry and "binary_data_size" not in entry.get("parameters", {})
        got = shm.get_contents_as_numpy(regions["http_out0"], np.int32, [1, 16])
        np.testing.assert_array_equal(got, A + B)
        with pytest.raises(InferenceServerException) as info:
            hc.get_system_shared_memory_status("nope")
        assert info.value.status() == "404"
    finally:
        hc.unregister_system_shared_memory()
        for region in regions.values():
            shm.destroy_shared_memory_region(region)
    assert hc.get_system_shared_memory_status() == []


def test_cuda_shared_memory_answers_as_grpc_does(served, gc) -> None:
    assert post(served, "/v2/cudasharedmemory/status", method="GET")[2] == b"[]"
    status, message = error_of(
        post(
            served,
            "/v2/cudasharedmemory/region/gpu0/register",
            json.dumps({"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 8}).encode(),
        )
    )
    assert status == 400 and message.endswith("GPUs not supported")
    status, message = error_of(post(served, "/v2/cudasharedmemory/region/x/status", method="GET"))
    assert status == 404 and "Unable to find cuda shared memory region: 'x'" in message


# -- errors and their status codes -------------------------------------------------------------


def test_errors_carry_tritons_status_codes(served, hc) -> None:
    with pytest.raises(InferenceServerException) as info:
        hc.infer("wrong_model_name", simple_inputs(True, A, B))
    assert info.value.status() == "404"
    assert "Request for unknown model: 'wrong_model_name'" in info.value.message()

    wrong = [
        httpclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(A.astype(np.float32)),
        simple_inputs(True, A, B)[1],
    ]
    with pytest.raises(InferenceServerException) as info:
        hc.infer("simple", wrong)
    assert info.value.status() == "400" and "INPUT0" in info.value.message()

    assert error_of(post(served, "/v2/no/such/path", method="GET")) == (404, "Not Found")
    assert error_of(post(served, "/v2/models/simple/infer", method="GET")) == (
        405,
        "Method Not Allowed",
    )
    assert post(served, "/v2/health/ready", method="GET")[0] == 200
    assert post(served, "/v2/models/no_such_model/ready", method="GET")[0] == 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"inputs": 3}', "'inputs' must be a list"),
        (b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32"}]}', "'data'"),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", '
            b'"data": [1, 2]}]}',
            "'data' has 2 elements but shape [1, 16] needs 16",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", '
            b'"data": ["a"]}]}',
            "unable to parse 'data'",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, -16], "datatype": "INT32", "data": []}]}',
            "'shape' must hold non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1099511627776], "datatype": "INT32", '
            b'"data": [1]}]}',
            "needs 1099511627776",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    ],
)
def test_bad_json_bodies_are_400_with_a_reason(served, body: bytes, reason: str) -> None:
    status, message = error_of(post(served, "/v2/models/simple/infer", body))
    assert status == 400 and reason in message, message


def binary_body(sizes: list[int], payload: bytes) -> tuple[bytes, int]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": f"INPUT{i}",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": size},
                }
                for i, size in enumerate(sizes)
            ]
        }
    ).encode()
    return head + payload, len(head)


def test_binary_sizes_must_add_up(served) -> None:
    good = A.tobytes() + B.tobytes()
    body, head = binary_body([64, 64], good)
    status, headers, data = post(
        served, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": str(head)}
    )
    assert status == 200, data

    body, head = binary_body([64, 64], good + b"extra")
    status, message = error_of(
        post(
            served, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": str(head)}
        )
    )
    assert status == 400 and "add up to 128 bytes but the request carries 133" in message

    body, head = binary_body([64, 640], good)
    status, message = error_of(
        post(
            served, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": str(head)}
        )
    )
    assert status == 400 and "runs past the end of the request body" in message


def test_large_json_head_is_refused_and_large_binary_bodies_still_flow(server_factory) -> None:
    """Parsing JSON numbers holds the GIL (~55 ms per MiB; a 60 MB `data` array stalled the
    whole server for 3.3 s), so the JSON part of an infer body is bounded at 8 MiB, before it
    is parsed; large tensors go as binary data, which is parsed and encoded off the event loop
    (here gzip both ways, so inflating and deflating take that path too)."""
    server = server_factory(MODEL_REPOSITORY)
    count = 5_000_000
    body = (
        f'{{"inputs":[{{"name":"INPUT0","shape":[1,{count}],"datatype":"INT32","data":['
        + ",".join(["0"] * count)
        + "]}]}"
    ).encode()
    assert len(body) > 8 << 20
    status, message = error_of(post(server, "/v2/models/simple/infer", body))
    assert status == 400, message
    assert "exceeds the maximum of 8388608 bytes" in message and "binary data" in message

    strings = np.array([[b"%07d" % i for i in range(300_000)]], dtype=object)  # ~3.3 MB
    tensor = httpclient.InferInput("INPUT0", list(strings.shape), "BYTES")
    tensor.set_data_from_numpy(strings, binary_data=True)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        result = client.infer(
            "simple_identity",
            [tensor],
            outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)],
            request_compression_algorithm="gzip",
            response_compression_algorithm="gzip",
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), strings)
        assert client.is_server_live()
    finally:
        client.close()


@pytest.mark.parametrize("value", ["-1", "abc", "99999999", "1, 2", "\u0663".encode()])
def test_bad_inference_header_content_length(served, value: str | bytes) -> None:
    body, _ = binary_body([64, 64], A.tobytes() + B.tobytes())
    status, message = error_of(
        post(served, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": value})
    )
    assert status == 400 and "Inference-Header-Content-Length" in message


def test_oversize_content_length_is_refused_before_the_body_is_read(served) -> None:
    """The server answers from the header alone: the client never sends the body."""
    conn = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    conn.putrequest("POST", "/v2/models/simple/infer")
    conn.putheader("Content-Length", str(50 << 30))
    conn.endheaders()
    response = conn.getresponse()
    message = json.loads(response.read())["error"]
    conn.close()
    assert response.status == 400
    assert f"request body of {50 << 30} bytes exceeds the maximum allowed value of {LIMIT}" in (
        message
    )
    assert "--http-max-input-size" in message


def test_expect_100_continue_is_answered_after_the_size_check(served) -> None:
    """curl sends `Expect: 100-continue` before a large body and waits for the interim reply;
    an oversize one is refused instead, so its body is never sent."""
    import socket

    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [2] * 16}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()

    def head(length: int) -> bytes:
        return (
            f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        ).encode()

    with socket.create_connection(("127.0.0.1", served.http_port), timeout=30) as sock:
        sock.sendall(head(len(body)))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK") and b'"data":[4,4,4' in reply
    with socket.create_connection(("127.0.0.1", served.http_port), timeout=30) as sock:
        sock.sendall(head(LIMIT + 1))
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"100 Continue" not in reply


def test_chunked_body_past_the_limit_is_refused(served) -> None:
    def chunks():
        for _ in range(40):
            yield bytes(64 << 10)

    conn = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    conn.request("POST", "/v2/models/simple/infer", body=chunks(), encode_chunked=True)
    response = conn.getresponse()
    message = json.loads(response.read())["error"]
    conn.close()
    assert response.status == 400 and f"more than {LIMIT} bytes" in message


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_decompression_bomb_is_refused_within_the_limit(served, encoding: str) -> None:
    inflated = bytes(256 << 20)  # 256 MiB of zeros, ~250 KB compressed
    bomb = gzip.compress(inflated, 9) if encoding == "gzip" else zlib.compress(inflated, 9)
    del inflated
    assert len(bomb) < LIMIT
    rss_before = served_rss(served)
    status, message = error_of(
        post(served, "/v2/models/simple/infer", bomb, {"Content-Encoding": encoding})
    )
    assert status == 400
    assert f"decompressed request body of more than {LIMIT} bytes" in message
    assert served_rss(served) - rss_before < 64 << 10  # KiB: far below the 256 MiB it inflates to


def served_rss(server: Any) -> int:
    from e2e_support import rss_kib

    return rss_kib(server.proc.pid)


def test_corrupt_compressed_body_is_400(served) -> None:
    status, message = error_of(
        post(served, "/v2/models/simple/infer", b"not gzip at all", {"Content-Encoding": "gzip"})
    )
    assert status == 400 and "cannot be decompressed" in message
    status, message = error_of(
        post(served, "/v2/models/simple/infer", b"x", {"Content-Encoding": "br"})
    )
    assert status == 400 and "unsupported Content-Encoding 'br'" in message


def test_huge_binary_shape_is_refused(served) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [2**31, 2**31],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    status, message = error_of(
        post(
            served,
            "/v2/models/simple/infer",
            head + bytes(8),
            {"Inference-Header-Content-Length": str(len(head))},
        )
    )
    assert status == 400, message


# -- settings, restriction ------------------------------------------------------------------------


def test_trace_and_log_settings_match_grpc(served, gc) -> None:
    """/v2/trace/setting and /v2/logging are the TraceSetting and LogSettings RPCs in
    Triton's HTTP JSON: trace_level a list, every other trace setting one string."""
    status, _, body = post(served, "/v2/trace/setting", method="GET")
    assert status == 200, body
    settings = json.loads(body)
    twin = gc.get_trace_settings(as_json=True)["settings"]
    assert isinstance(settings["trace_level"], list)
    assert settings["trace_level"] == twin["trace_level"]["value"]
    assert settings["trace_rate"] == twin["trace_rate"]["value"][0]

    update = json.dumps({"trace_rate": "7"}).encode()
    status, _, body = post(served, "/v2/models/simple/trace/setting", update)
    assert status == 200 and json.loads(body)["trace_rate"] == "7", body
    assert gc.get_trace_settings("simple", as_json=True)["settings"]["trace_rate"]["value"] == ["7"]
    cleared = json.dumps({"trace_rate": None}).encode()
    status, _, body = post(served, "/v2/models/simple/trace/setting", cleared)
    assert status == 200 and json.loads(body)["trace_rate"] == settings["trace_rate"], body

    status, message = error_of(
        post(served, "/v2/trace/setting", json.dumps({"trace_file": "/tmp/x"}).encode())
    )
    assert status == 501 and "can not be updated through network protocol" in message
    status, message = error_of(
        post(served, "/v2/trace/setting", json.dumps({"trace_rate": "abc"}).encode())
    )
    assert status == 400 and "Unable to parse 'trace_rate'" in message

    status, _, body = post(served, "/v2/logging", method="GET")
    assert status == 200, body
    logging = json.loads(body)
    assert logging["log_verbose_level"] == 0 and logging["log_info"] is True
    status, _, body = post(served, "/v2/logging", b'{"log_verbose_level": 1}')
    assert status == 200 and json.loads(body)["log_verbose_level"] == 1, body
    assert gc.get_log_settings(as_json=True)["settings"]["log_verbose_level"]["uint32_param"] == 1
    assert post(served, "/v2/logging", b'{"log_verbose_level": 0}')[0] == 200
    status, message = error_of(post(served, "/v2/logging", b'{"log_info": [1]}'))
    assert status == 400 and "log setting 'log_info'" in message
    status, message = error_of(post(served, "/v2/logging", b'{"log_info": 3}'))
    assert status == 400 and "expect boolean for 'log_info'" in message


@pytest.mark.parametrize("value", ["1_000", "\u0663", "5abc", "0x10", "1e3", ""])
def test_trace_numbers_must_be_ascii_integers(served, gc, value: str) -> None:
    """int() alone took "1_000" and other scripts' digits; a rate is plain digits on both
    front ends, and a refused update changes nothing."""
    before = json.loads(post(served, "/v2/trace/setting", method="GET")[2])
    body = json.dumps({"trace_rate": value}).encode()
    status, message = error_of(post(served, "/v2/trace/setting", body))
    assert status == 400 and "Unable to parse 'trace_rate'" in message, message
    with pytest.raises(InferenceServerException, match="Unable to parse 'trace_rate'"):
        gc.update_trace_settings(settings={"trace_rate": value})
    assert json.loads(post(served, "/v2/trace/setting", method="GET")[2]) == before


def test_restricted_api_needs_its_header(server_factory) -> None:
    server = server_factory(MODEL_REPOSITORY, "--http-restricted-api=inference,statistics:Admin=s3")
    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    status, message = error_of(post(server, "/v2/models/simple/infer", body))
    assert (status, message) == (403, "This API is restricted, expecting header 'admin'")
    assert error_of(post(server, "/v2/models/simple/infer", body, {"admin": "wrong"}))[0] == 403
    assert post(server, "/v2/models/simple/infer", body, {"Admin": "s3"})[0] == 200
    assert post(server, "/v2/models/stats", method="GET")[0] == 403
    assert post(server, "/v2/health/ready", method="GET")[0] == 200  # not restricted
    assert server.terminate() == 0


def test_fp16_and_bool_json_round_trip(server_factory, tmp_path) -> None:
    """Datatypes whose JSON form needs care: FP16 (numbers), BOOL (true/false)."""
    from e2e_support import identity_model

    identity_model(tmp_path, "id_fp16", "FP16", [4], 0)
    identity_model(tmp_path, "id_bool", "BOOL", [4], 0)
    server = server_factory(tmp_path)
    client = httpclient.InferenceServerClient(server.http_url)
    for model, arr in (
        ("id_fp16", np.array([0.5, -2.0, 1024.0, 0.0], dtype=np.float16)),
        ("id_bool", np.array([True, False, True, True])),
    ):
        for binary in (True, False):
            tensor = httpclient.InferInput("INPUT0", [4], np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr, binary_data=binary)
            out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
            got = client.infer(model, [tensor], outputs=[out]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(got, arr)
    client.close()
    assert server.terminate() == 0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (2**40, "out of range for INT32"),
        (-(2**63) - 1, "got non-numbers"),  # past int64: numpy keeps Python ints
        (2**64, "got non-numbers"),
        (1.5, "numbers with fractions"),
        (float("nan"), "numbers with fractions"),
        (float("inf"), "numbers with fractions"),
        (True, "expected INT32 numbers, got booleans"),  # Triton: not an integer either
    ],
)
def test_bad_int_data_is_refused(served, value: Any, reason: str) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [value] * 16}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    status, message = error_of(post(served, "/v2/models/simple/infer", body))
    assert status == 400 and reason in message, message


def test_shutdown_drains_http_requests_in_flight(server_factory, tmp_path) -> None:
    """SIGTERM while an HTTP request is inside ONNX Runtime: the request still gets its 200,
    then the port closes and the server exits 0."""
    import threading

    from e2e_support import wait_for
    from test_hardening import _slow_model_repository

    server = server_factory(_slow_model_repository(tmp_path / "models", matmuls=40, n=1024))
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]})
    answers: list[tuple[int, bytes]] = []

    def call() -> None:
        status, _, data = post(server, "/v2/models/slow/infer", body.encode())
        answers.append((status, data))

    def cpu_seconds() -> float:
        fields = open(f"/proc/{server.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    idle = cpu_seconds()
    caller = threading.Thread(target=call)
    caller.start()
    # the model computes for seconds: its CPU time shows the request is inside ONNX Runtime
    wait_for(lambda: cpu_seconds() - idle > 0.3, what="the slow model to start computing")
    assert server.terminate(timeout=60) == 0
    caller.join(30)
    assert answers and answers[0][0] == 200, answers
    assert "outputs" in json.loads(answers[0][1])
    with pytest.raises(ConnectionRefusedError):
        post(server, "/v2/health/live", method="GET")


def test_http_sequence_ids_are_uint64_as_on_grpc(hc, gc) -> None:
    """tritonclient.http sends sequence_id as a JSON number, which Triton reads as uint64;
    2^64-1 over HTTP is the sequence a gRPC client names as int64 -1."""

    def value(client: Any, module: Any, **kwargs: Any) -> int:
        tensor = module.InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[5]], dtype=np.int32))
        return int(client.infer("simple_sequence", [tensor], **kwargs).as_numpy("OUTPUT")[0, 0])

    value(hc, httpclient, sequence_id=2**64 - 1, sequence_start=True)
    value(gc, grpcclient, sequence_id=-1, sequence_end=True)  # the same sequence: no START
    with pytest.raises(InferenceServerException, match="START"):
        value(gc, grpcclient, sequence_id=-1)  # it has ended
    value(hc, httpclient, sequence_id=2**63, sequence_start=True, sequence_end=True)
    with pytest.raises(InferenceServerException, match="out of int64 range"):
        value(hc, httpclient, sequence_id=2**64, sequence_start=True)


def test_connections_are_capped_over_every_event_loop(server_factory) -> None:
    """Idle connections held sockets until the process ran out of file descriptors (which
    gRPC and model loads need too): past --http-max-connections, counted over every event
    loop, a connection is closed as soon as it is accepted, and a freed place is taken again."""
    server = server_factory(MODEL_REPOSITORY, "--http-max-connections=4", "--http-thread-count=2")
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"

    def answered(sock: socket.socket) -> bool:
        """True if a request on `sock` is answered; False if the server closed it."""
        sock.settimeout(30)
        try:
            sock.sendall(probe)
            return sock.recv(64).startswith(b"HTTP/1.1 200")
        except ConnectionError:
            return False

    held = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(4)]
    try:
        assert all(answered(sock) for sock in held)  # all four are being served
        with socket.create_connection(("127.0.0.1", server.http_port)) as extra:
            assert not answered(extra)
        client = grpcclient.InferenceServerClient(server.url)
        try:
            assert client.is_server_live()  # gRPC is untouched
        finally:
            client.close()
        held.pop().close()
        deadline = time.monotonic() + 30
        while True:  # the server sees the close asynchronously
            with socket.create_connection(("127.0.0.1", server.http_port)) as again:
                if answered(again):
                    break
            assert time.monotonic() < deadline, "a freed connection place was never reused"
        assert "(--http-max-connections)" in server.log()
    finally:
        for sock in held:
            sock.close()


def test_several_event_loops_share_the_port(server_factory) -> None:
    """--http-thread-count=3: the three loops start on one socket, concurrent clients are all
    served, and shutdown stops every loop (exit status 0, no thread left holding the exit)."""
    from concurrent.futures import ThreadPoolExecutor

    server = server_factory(MODEL_REPOSITORY, "--http-thread-count=3")
    body = json.dumps(
        {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [5] * 16}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(server, "/v2/models/simple/infer", body), range(48)))
    assert [status for status, _, _ in answers] == [200] * 48
    assert all(json.loads(data)["outputs"][0]["data"] == [10] * 16 for _, _, data in answers)
    assert server.terminate() == 0
