"""End-to-end tests of the Python SDK (`tributary_client`) against a real `tributary` server.

Every test talks to a real server process over loopback, except the BYTES codec checks, which
are pure functions. Retry tests inject the sleep, so nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sdk_support import CountingInterceptor, refused_url, simple_inputs

from tributary_client import (
    AsyncClient,
    Client,
    InferenceServerError,
    RetryPolicy,
    StreamRequest,
    TLSConfig,
    deserialize_bytes,
    serialize_bytes,
)
from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client.health import check as health_check
from tributary_client.health import main as health_main

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def sdk(server) -> Iterator[Client]:
    with Client(server.url, timeout=30) as client:
        yield client


@pytest.fixture
def dead_url() -> Iterator[str]:
    with refused_url() as url:
        yield url


# -- BYTES codec (pure) ---------------------------------------------------------------------


def test_bytes_codec_round_trip_and_rejects_malformed() -> None:
    items = np.array([b"", b"\x00", "h\u00e9llo \u2713", b"a\x00b"], dtype=object)
    blob = serialize_bytes(items)
    assert blob[:4] == b"\x00\x00\x00\x00" and blob[4:9] == b"\x01\x00\x00\x00\x00"
    decoded = deserialize_bytes(blob)
    assert list(decoded) == [b"", b"\x00", "h\u00e9llo \u2713".encode(), b"a\x00b"]
    with pytest.raises(ValueError, match="truncated"):
        deserialize_bytes(blob[:-5] + b"\x07")
    with pytest.raises(ValueError, match="overruns"):
        deserialize_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(ValueError, match="expected 3"):
        deserialize_bytes(blob, count=3)
    with pytest.raises(TypeError, match="bytes or str"):
        serialize_bytes(np.array([1, None], dtype=object))


# -- inference ------------------------------------------------------------------------------


def test_infer_simple_numpy_in_numpy_out(sdk: Client) -> None:
    inputs = simple_inputs(batch=3)
    result = sdk.infer("simple", inputs, request_id="req-42")
    assert result.id == "req-42"
    assert (result.model_name, result.model_version) == ("simple", "1")
    assert list(result) == ["OUTPUT0", "OUTPUT1"]
    assert result["OUTPUT0"].dtype == np.int32 and result["OUTPUT0"].shape == (3, 16)
    np.testing.assert_array_equal(result["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
    np.testing.assert_array_equal(result["OUTPUT1"], inputs["INPUT0"] - inputs["INPUT1"])


def test_infer_subset_of_outputs_and_request_parameters(server) -> None:
    counter = CountingInterceptor()
    with Client(server.url, interceptors=[counter]) as client:
        inputs = simple_inputs(offset=100)
        result = client.infer(
            "simple", inputs, outputs=["OUTPUT1"], priority=1, timeout_us=10_000_000
        )
    assert list(result) == ["OUTPUT1"]
    np.testing.assert_array_equal(result["OUTPUT1"], inputs["INPUT0"] - 3)
    sent = counter.last_request
    assert isinstance(sent, pb.ModelInferRequest)
    assert sent.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert sent.parameters["priority"].uint64_param == 1
    assert sent.parameters["timeout"].int64_param == 10_000_000
    assert len(sent.raw_input_contents) == 2 and not sent.inputs[0].HasField("contents")


def test_bytes_round_trip_on_simple_identity(sdk: Client) -> None:
    items = np.array(
        [[b"", b"\x00\x00", "a\x00b"], ["h\u00e9llo", "\U0001f680 rocket", bytes(range(128))]],
        dtype=object,
    )
    result = sdk.infer("simple_identity", {"INPUT0": items})
    out = result["OUTPUT0"]
    assert out.dtype == object and out.shape == (2, 3)
    expected = [[x.encode() if isinstance(x, str) else x for x in row] for row in items]
    assert out.tolist() == expected


def test_simple_string_sums(sdk: Client) -> None:
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["7"] * 16])  # a numpy str_ array is BYTES too
    result = sdk.infer("simple_string", {"INPUT0": a, "INPUT1": b})
    assert result["OUTPUT0"].tolist() == [[str(i + 7).encode() for i in range(16)]]
    assert result["OUTPUT1"].tolist() == [[str(i - 7).encode() for i in range(16)]]


def test_digits_with_classification(sdk: Client) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.data[:6].astype(np.float32)
    plain = sdk.infer("digits", {"input": images})
    assert plain["probabilities"].shape == (6, 10)
    assert plain["label"].dtype == np.int64
    np.testing.assert_array_equal(plain["label"].ravel(), digits.target[:6])

    top = sdk.infer("digits", {"input": images}, classification={"probabilities": 3})
    assert list(top) == ["probabilities"]  # no `outputs`: only the classified one is requested
    assert top["probabilities"].shape == (6, 3)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for row, probs, target in zip(
        top["probabilities"], plain["probabilities"], digits.target[:6], strict=True
    ):
        fields = [item.decode().split(":") for item in row]
        values = [float(f[0]) for f in fields]
        assert values == sorted(values, reverse=True)
        assert int(fields[0][1]) == target == int(np.argmax(probs))
        assert fields[0][2] == names[target]
        assert values[0] == pytest.approx(float(probs[target]), abs=1e-6)


# -- health, metadata, config, statistics ---------------------------------------------------


def test_health_metadata_config_and_index(sdk: Client) -> None:
    assert sdk.is_live() and sdk.is_ready()
    assert sdk.is_model_ready("simple") and sdk.is_model_ready("simple", "1")
    meta = sdk.server_metadata()
    assert meta.name and "classification" in meta.extensions
    model = sdk.model_metadata("simple")
    assert (model.name, model.versions, model.platform) == ("simple", ("1",), "onnxruntime_onnx")
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [
        ("INPUT0", "INT32", (-1, 16)),
        ("INPUT1", "INT32", (-1, 16)),
    ]
    assert [t.name for t in model.outputs] == ["OUTPUT0", "OUTPUT1"]
    config = sdk.model_config("digits")
    assert config.name == "digits" and config.max_batch_size == 64
    assert [o.label_filename for o in config.output] == ["", "labels.txt"]
    index = {entry.name: entry for entry in sdk.repository_index()}
    assert index["simple"].state == "READY" and index["simple"].version == "1"


def test_statistics_count_exactly_the_requests_made(sdk: Client) -> None:
    def snapshot():
        (stats,) = sdk.statistics("simple_int8")
        return stats.inference_stats.success.count, stats.inference_count

    success_before, inferences_before = snapshot()
    a = np.arange(16, dtype=np.int8).reshape(1, 16)
    for batch in (1, 2, 1):
        inputs = {"INPUT0": np.repeat(a, batch, 0), "INPUT1": np.ones((batch, 16), np.int8)}
        result = sdk.infer("simple_int8", inputs)
        np.testing.assert_array_equal(result["OUTPUT0"], inputs["INPUT0"] + 1)
    success_after, inferences_after = snapshot()
    assert success_after - success_before == 3  # requests
    assert inferences_after - inferences_before == 4  # batch elements


# -- errors and retries ---------------------------------------------------------------------


def test_unknown_model_is_not_found_with_the_server_message(sdk: Client) -> None:
    with pytest.raises(InferenceServerError) as info:
        sdk.infer("no_such_model", simple_inputs())
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "Request for unknown model: 'no_such_model' is not found"
    assert str(info.value).startswith("[NOT_FOUND] Request for unknown model")
    with pytest.raises(InferenceServerError) as meta:
        sdk.model_metadata("no_such_model")
    assert meta.value.code == grpc.StatusCode.NOT_FOUND


def test_wrong_shape_is_invalid_argument_and_never_retried(server) -> None:
    sleeps: list[float] = []
    counter = CountingInterceptor()
    policy = RetryPolicy(retry_on=tuple(grpc.StatusCode), sleep=sleeps.append)
    with Client(server.url, retry=policy, interceptors=[counter]) as client:
        inputs = {"INPUT0": np.zeros((1, 8), np.int32), "INPUT1": np.zeros((1, 8), np.int32)}
        with pytest.raises(InferenceServerError) as info:
            client.infer("simple", inputs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected shape for input 'INPUT0' for model 'simple'" in info.value.message
    assert counter.calls == ["ModelInfer"] and sleeps == []


def test_retries_unavailable_with_deterministic_backoff(dead_url: str) -> None:
    sleeps: list[float] = []
    counter = CountingInterceptor()
    with Client(dead_url, retry=RetryPolicy(sleep=sleeps.append), interceptors=[counter]) as c:
        with pytest.raises(InferenceServerError) as info:
            c.is_live()
    assert info.value.code == UNAVAILABLE
    assert counter.calls == ["ServerLive"] * 3 and sleeps == [0.05, 0.1]

    sleeps.clear()
    counter.calls.clear()
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=1.0, sleep=sleeps.append)
    with Client(dead_url, retry=policy, interceptors=[counter]) as c:
        with pytest.raises(InferenceServerError) as info:
            c.infer("simple", simple_inputs())
    assert info.value.code == UNAVAILABLE
    assert counter.calls == ["ModelInfer"] * 5 and sleeps == [0.5, 1.0, 1.0, 1.0]


def test_retry_limits_infer_codes_deadline_and_none(server, dead_url: str) -> None:
    sleeps: list[float] = []
    counter = CountingInterceptor()
    not_found = (UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    policy = RetryPolicy(retry_on=not_found, sleep=sleeps.append)
    with Client(server.url, retry=policy, interceptors=[counter]) as client:
        with pytest.raises(InferenceServerError):
            client.model_metadata("no_such_model")  # idempotent: retried on any retry_on code
        assert counter.calls == ["ModelMetadata"] * 3
        counter.calls.clear()
        with pytest.raises(InferenceServerError):
            client.infer("no_such_model", simple_inputs())  # infer: UNAVAILABLE only
        assert counter.calls == ["ModelInfer"]

    counter.calls.clear()
    slow = RetryPolicy(initial_backoff=60.0, max_backoff=60.0, sleep=sleeps.append)
    with Client(dead_url, retry=slow, interceptors=[counter]) as client:
        with pytest.raises(InferenceServerError):
            client.infer("simple", simple_inputs(), timeout=30.0)  # a retry would overrun it
    assert counter.calls == ["ModelInfer"]

    counter.calls.clear()
    with Client(dead_url, retry=None, interceptors=[counter]) as client:
        with pytest.raises(InferenceServerError):
            client.is_ready()
    assert counter.calls == ["ServerReady"]
    assert sleeps == [0.05, 0.1]  # only the two metadata retries ever slept


# -- TLS ------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server cert for `tributary.test` and a client cert, via openssl."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=Tributary Test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=DNS:tributary.test\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=tributary-{name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.crt", cwd=d)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_server(server_factory, pki: Path):
    return server_factory(
        MODEL_REPOSITORY,
        "--grpc-use-ssl=true",
        "--grpc-server-cert", str(pki / "server.crt"),
        "--grpc-server-key", str(pki / "server.key"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def mtls_server(server_factory, pki: Path):
    return server_factory(
        MODEL_REPOSITORY,
        "--grpc-use-ssl-mutual=true",
        "--grpc-server-cert", str(pki / "server.crt"),
        "--grpc-server-key", str(pki / "server.key"),
        "--grpc-root-cert", str(pki / "ca.crt"),
    )  # fmt: skip


def test_tls_end_to_end(tls_server, server, pki: Path) -> None:
    tls = TLSConfig.from_files(pki / "ca.crt", server_name_override="tributary.test")
    with Client(server.url, tls=tls, retry=None, timeout=30) as tls_to_plaintext:
        with pytest.raises(InferenceServerError) as info:
            tls_to_plaintext.is_live()
        assert info.value.code == UNAVAILABLE
    with Client(tls_server.url, tls=tls, timeout=30) as client:
        assert client.is_ready()
        inputs = simple_inputs()
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result["OUTPUT0"], inputs["INPUT0"] + 3)
    with Client(tls_server.url, retry=None, timeout=30) as plaintext:
        with pytest.raises(InferenceServerError) as info:
            plaintext.is_live()
        assert info.value.code == UNAVAILABLE
    wrong_name = TLSConfig.from_files(pki / "ca.crt", server_name_override="other.test")
    with Client(tls_server.url, tls=wrong_name, retry=None, timeout=30) as mismatched:
        with pytest.raises(InferenceServerError) as info:
            mismatched.is_live()
        assert info.value.code == UNAVAILABLE


def test_mutual_tls_needs_the_client_certificate(mtls_server, pki: Path) -> None:
    tls = TLSConfig.from_files(
        pki / "ca.crt",
        pki / "client.key",
        pki / "client.crt",
        server_name_override="tributary.test",
    )
    with Client(mtls_server.url, tls=tls, timeout=30) as client:
        assert client.model_metadata("simple").name == "simple"
    anonymous = TLSConfig.from_files(pki / "ca.crt", server_name_override="tributary.test")
    with Client(mtls_server.url, tls=anonymous, retry=None, timeout=30) as client:
        with pytest.raises(InferenceServerError) as info:
            client.is_live()
        assert info.value.code == UNAVAILABLE


# -- tributary-health (the installed console script, as a container HEALTHCHECK runs it) -----


def health_cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "tributary-health"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_health_cli_plaintext(server, dead_url: str) -> None:
    ok = health_cli(server.url, "--timeout", "10")
    assert (ok.returncode, ok.stdout) == (0, "status: SERVING\n")
    named = health_cli(server.url, "--service", "inference.GRPCInferenceService", "--timeout", "10")
    assert (named.returncode, named.stdout) == (0, "status: SERVING\n")
    unknown = health_cli(server.url, "--service", "no.such.Service", "--timeout", "10")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    down = health_cli(dead_url, "--timeout", "2")
    assert down.returncode == 1 and "health check failed: UNAVAILABLE" in down.stderr


def test_health_cli_follows_a_tls_server(tls_server, pki: Path) -> None:
    ca = str(pki / "ca.crt")
    ok = health_cli(
        tls_server.url, "--ca", ca, "--server-name", "tributary.test", "--timeout", "10"
    )
    assert (ok.returncode, ok.stdout) == (0, "status: SERVING\n"), ok.stderr
    # --tls alone trusts only the system roots, which never signed our throwaway CA
    untrusted = health_cli(tls_server.url, "--tls", "--server-name", "tributary.test")
    assert untrusted.returncode == 1 and "UNAVAILABLE" in untrusted.stderr
    plaintext = health_cli(tls_server.url, "--timeout", "5")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    wrong_name = health_cli(tls_server.url, "--ca", ca, "--server-name", "other.test")
    assert wrong_name.returncode == 1 and "UNAVAILABLE" in wrong_name.stderr


def test_health_cli_mutual_tls_and_usage_errors(mtls_server, pki: Path) -> None:
    common = ["--ca", str(pki / "ca.crt"), "--server-name", "tributary.test", "--timeout", "10"]
    client_cert = ["--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")]
    ok = health_cli(mtls_server.url, *common, *client_cert)
    assert (ok.returncode, ok.stdout) == (0, "status: SERVING\n"), ok.stderr
    anonymous = health_cli(mtls_server.url, *common)
    assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr
    half = health_cli(mtls_server.url, *common, "--cert", str(pki / "client.crt"))
    assert half.returncode == 2 and "--cert and --key go together" in half.stderr
    missing = health_cli(mtls_server.url, "--ca", str(pki / "nope.crt"))
    assert missing.returncode == 2 and "nope.crt" in missing.stderr


def _usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """tributary-health's main() with `args`: must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as info:
        health_main(list(args))
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("tributary-health: error: "), err
    return err


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e300", "0", "-1", "ten"])
def test_health_cli_refuses_timeouts_grpc_cannot_honour(
    capsys: pytest.CaptureFixture[str], dead_url: str, bad: str
) -> None:
    # nan, inf and 1e300 used to reach grpc and fail at once with DEADLINE_EXCEEDED (exit 1)
    err = _usage_error(capsys, dead_url, f"--timeout={bad}")  # "=": -inf is no option
    assert "argument --timeout: " in err and repr(bad) in err
    with pytest.raises(ValueError, match="timeout must be > 0"):
        health_check(dead_url, timeout=float(bad) if bad != "ten" else -1)


def test_health_cli_refuses_tls_files_that_are_not_the_right_pem(
    capsys: pytest.CaptureFixture[str], pki: Path, tmp_path: Path, dead_url: str
) -> None:
    """Found before connecting: grpc would only see it at connect time, exit 1 with C-core
    log lines on stderr. The last case shows a bad file from the console script itself."""
    ca, cert, key = (str(pki / name) for name in ("ca.crt", "client.crt", "client.key"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nno base64 here!\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkcs8", "-topk8", "-in", key, "-out", str(encrypted), "-passout", "pass:x",
             cwd=tmp_path)  # fmt: skip
    cases = {
        ("--ca", str(garbage)): "not a PEM file (no -----BEGIN ...----- block)",
        ("--ca", str(fake)): "its CERTIFICATE block is not valid base64",
        ("--ca", key): "holds no PEM certificate, only PRIVATE KEY",
        ("--ca", ca, "--cert", key, "--key", key): "--cert ",
        ("--ca", ca, "--cert", cert, "--key", cert): "holds no PEM private key, only CERTIFICATE",
        ("--ca", ca, "--cert", cert, "--key", str(encrypted)): "private key is encrypted",
    }
    for args, message in cases.items():
        err = _usage_error(capsys, dead_url, *args, "--timeout", "5")
        assert message in err, (args, err)
    run = health_cli(dead_url, "--ca", str(garbage))
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"tributary-health: error: --ca {garbage}: not a PEM file (no -----BEGIN ...----- "
        "block) (see --help)\n"
    )


# -- streaming ------------------------------------------------------------------------------


def test_stream_keeps_order_and_survives_a_bad_request(sdk: Client) -> None:
    bad = {"INPUT0": np.zeros((1, 4), np.int32), "INPUT1": np.zeros((1, 4), np.int32)}
    with sdk.stream("simple") as stream:
        for i in range(20):
            stream.send(bad if i == 10 else simple_inputs(offset=i), request_id=f"r{i}")
        stream.close()
        answers = list(stream)
    assert [a.id for a in answers] == [f"r{i}" for i in range(20)]
    errors = [a for a in answers if not a.ok]
    assert [e.id for e in errors] == ["r10"]
    assert "unexpected shape for input 'INPUT0'" in (errors[0].error or "")
    with pytest.raises(InferenceServerError) as info:
        errors[0].get()
    assert info.value.code is None
    for i, answer in enumerate(answers):
        if i != 10:
            expected = simple_inputs(offset=i)["INPUT0"] + 3
            np.testing.assert_array_equal(answer.get()["OUTPUT0"], expected)
    assert len([a for a in answers if a.ok]) == 19


def test_stream_cancel_and_broken_stream(sdk: Client, dead_url: str) -> None:
    with sdk.stream("simple") as stream:
        for i in range(3):
            stream.send(simple_inputs(offset=i), request_id=str(i))
        first = next(stream)
    assert first.id == "0" and first.ok  # leaving early cancelled the rest...
    assert sdk.infer("simple", simple_inputs(), request_id="after").id == "after"  # ...only
    with Client(dead_url) as client, client.stream("simple") as stream:
        stream.send(simple_inputs())
        with pytest.raises(InferenceServerError) as info:
            next(stream)
    assert info.value.code == UNAVAILABLE


# -- asyncio --------------------------------------------------------------------------------


def test_asyncio_gather_and_stream(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.url, timeout=30) as client:
            assert await client.is_ready()
            assert (await client.model_metadata("simple")).inputs[0].shape == (-1, 16)
            results = await asyncio.gather(
                *(
                    client.infer("simple", simple_inputs(offset=i), request_id=str(i))
                    for i in range(8)
                )
            )
            for i, result in enumerate(results):
                assert result.id == str(i)
                np.testing.assert_array_equal(
                    result["OUTPUT0"], simple_inputs(offset=i)["INPUT0"] + 3
                )

            async def requests():
                for i in range(5):
                    inputs = (
                        simple_inputs(offset=i) if i != 2 else {"INPUT0": simple_inputs()["INPUT0"]}
                    )
                    yield StreamRequest(inputs, request_id=f"s{i}", outputs=["OUTPUT1"])

            answers = [a async for a in client.stream("simple", requests())]
            assert [a.id for a in answers] == ["s0", "s1", "s2", "s3", "s4"]
            assert [a.ok for a in answers] == [True, True, False, True, True]
            assert "INPUT1" in (answers[2].error or "")
            assert list(answers[4].get()) == ["OUTPUT1"]
            np.testing.assert_array_equal(answers[4].get()["OUTPUT1"], np.arange(1, 17)[None])

            with pytest.raises(InferenceServerError) as info:
                await client.infer("no_such_model", simple_inputs())
            assert info.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_async_retry_awaits_an_injected_coroutine_sleep(dead_url: str) -> None:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def scenario() -> grpc.StatusCode | None:
        async with AsyncClient(dead_url, retry=RetryPolicy(sleep=fake_sleep)) as client:
            with pytest.raises(InferenceServerError) as info:
                await client.infer("simple", simple_inputs())
            return info.value.code

    assert asyncio.run(scenario()) == UNAVAILABLE
    assert sleeps == [0.05, 0.1]


# -- coexistence ----------------------------------------------------------------------------


def test_coexists_with_tritonclient_in_one_process(server, sdk: Client) -> None:
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2 as triton_pb

    # Same `inference.*` message names, different descriptor pools: no registration clash.
    ours, theirs = pb.ModelInferRequest.DESCRIPTOR, triton_pb.ModelInferRequest.DESCRIPTOR
    assert ours.full_name == theirs.full_name == "inference.ModelInferRequest"
    assert ours.file.pool is not theirs.file.pool
    # likewise our grpc.health.v1 stubs beside grpcio-health-checking's
    from grpc_health.v1 import health_pb2 as their_health

    from tributary_client._proto import health_pb2 as our_health

    ours, theirs = (
        our_health.HealthCheckRequest.DESCRIPTOR,
        their_health.HealthCheckRequest.DESCRIPTOR,
    )
    assert ours.full_name == theirs.full_name == "grpc.health.v1.HealthCheckRequest"
    assert ours.file.pool is not theirs.file.pool

    inputs = simple_inputs(batch=2, offset=5)
    with triton.InferenceServerClient(server.url) as tc:
        wrapped = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), "INT32")
            tensor.set_data_from_numpy(array)
            wrapped.append(tensor)
        theirs_result = tc.infer("simple", wrapped, request_id="t1")
        assert tc.is_model_ready("simple")
    ours_result = sdk.infer("simple", inputs, request_id="t1")
    for name in ("OUTPUT0", "OUTPUT1"):
        np.testing.assert_array_equal(theirs_result.as_numpy(name), ours_result[name])
    assert theirs_result.get_response().id == ours_result.id == "t1"
