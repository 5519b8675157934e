"""The flags table, the parser built from it, and docs/flags.md agree; Triton's command lines parse.

TRITONSERVER_FLAGS is every long option tritonserver's own parser has (in all its build
variants), so a flag Triton users pass can never be "unknown" here.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from tributary import cli, flags, logs

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "flags.md"
sys.path.insert(0, str(ROOT / "scripts"))

import flags_doc  # noqa: E402

TRITONSERVER_FLAGS = """
help id exit-timeout-secs model-store model-repository exit-on-error
disable-auto-complete-config strict-readiness model-control-mode repository-poll-secs
load-model model-config-name model-load-thread-count model-load-retry-count model-namespacing
enable-peer-access allow-http http-address http-port reuse-http-port
http-header-forward-pattern http-thread-count http-max-input-size http-restricted-api
allow-grpc grpc-address grpc-port reuse-grpc-port grpc-header-forward-pattern
grpc-infer-thread-count grpc-infer-allocation-pool-size grpc-max-response-pool-size
grpc-use-ssl grpc-use-ssl-mutual grpc-server-cert grpc-server-key grpc-root-cert
grpc-infer-response-compression-level grpc-keepalive-time grpc-keepalive-timeout
grpc-keepalive-permit-without-calls grpc-http2-max-pings-without-data
grpc-http2-min-recv-ping-interval-without-data grpc-http2-max-ping-strikes
grpc-max-connection-age grpc-max-connection-age-grace grpc-restricted-protocol log-verbose
log-info log-warning log-error log-format log-file allow-sagemaker sagemaker-port
sagemaker-safe-port-range sagemaker-thread-count allow-vertex-ai vertex-ai-port
vertex-ai-thread-count vertex-ai-default-model allow-metrics allow-gpu-metrics
allow-cpu-metrics metrics-address metrics-port metrics-interval-ms metrics-config
trace-config cache-config cache-directory rate-limit rate-limit-resource
pinned-memory-pool-byte-size cuda-memory-pool-byte-size cuda-virtual-address-size
min-supported-compute-capability buffer-manager-thread-count host-policy
model-load-gpu-limit allow-client-shm backend-directory backend-config repoagent-directory
strict-model-config response-cache-byte-size trace-file trace-level trace-rate trace-count
trace-log-frequency
""".split()

# A value tritonserver accepts for each flag that takes one (every refused value left out).
VALUES = {
    "id": "triton",
    "exit-timeout-secs": "5",
    "model-control-mode": "explicit",
    "repository-poll-secs": "15",
    "load-model": "simple",
    "model-config-name": "h100",
    "model-load-thread-count": "2",
    "model-load-retry-count": "1",
    "http-address": "0.0.0.0",
    "http-port": "8000",
    "http-header-forward-pattern": "x-.*",
    "http-thread-count": "8",
    "http-max-input-size": "67108864",
    "http-restricted-api": "model-repository:admin-key=admin-value",
    "grpc-address": "127.0.0.1",
    "grpc-port": "0",
    "grpc-header-forward-pattern": "x-.*",
    "grpc-infer-thread-count": "4",
    "grpc-infer-allocation-pool-size": "8",
    "grpc-max-response-pool-size": "16",
    "grpc-server-cert": "server.crt",
    "grpc-server-key": "server.key",
    "grpc-root-cert": "ca.crt",
    "grpc-infer-response-compression-level": "LOW",
    "grpc-keepalive-time": "10000",
    "grpc-keepalive-timeout": "5000",
    "grpc-http2-max-pings-without-data": "0",
    "grpc-http2-min-recv-ping-interval-without-data": "5000",
    "grpc-http2-max-ping-strikes": "0",
    "grpc-max-connection-age": "60000",
    "grpc-max-connection-age-grace": "5000",
    "grpc-restricted-protocol": "model-repository,statistics:admin-key=admin-value",
    "log-verbose": "1",
    "log-format": "ISO8601",
    "sagemaker-port": "8080",
    "sagemaker-safe-port-range": "8000-9000",
    "sagemaker-thread-count": "8",
    "vertex-ai-port": "8080",
    "vertex-ai-thread-count": "8",
    "vertex-ai-default-model": "simple",
    "metrics-address": "127.0.0.1",
    "metrics-port": "0",
    "metrics-interval-ms": "1000",
    "metrics-config": "summary_latencies=true",
    "trace-config": "triton,file=/tmp/trace.json",
    "cache-config": "local,size=1048576",
    "cache-directory": "/opt/tritonserver/caches",
    "rate-limit": "off",
    "rate-limit-resource": "R1:10:0",
    "pinned-memory-pool-byte-size": "268435456",
    "cuda-memory-pool-byte-size": "0:67108864",
    "cuda-virtual-address-size": "0:1073741824",
    "min-supported-compute-capability": "6.0",
    "buffer-manager-thread-count": "2",
    "host-policy": "gpu_0,numa-node=0",
    "model-load-gpu-limit": "0:0.8",
    "backend-directory": "/opt/tritonserver/backends",
    "backend-config": "onnxruntime,default-max-batch-size=8",
    "repoagent-directory": "/opt/tritonserver/repoagents",
    "response-cache-byte-size": "1048576",
    "trace-file": "/tmp/trace.json",
    "trace-level": "TIMESTAMPS",
    "trace-rate": "1000",
    "trace-count": "-1",
    "trace-log-frequency": "0",
}
BOOL_VALUES = {"allow-grpc": "true", "allow-sagemaker": "false", "allow-vertex-ai": "false"}
NOT_ON_ONE_LINE = {
    "help",
    "model-store",
    "model-repository",
    "grpc-use-ssl",
    "grpc-use-ssl-mutual",
    "response-cache-byte-size",  # with --cache-config: refused, as tritonserver does
}


def parser_flags() -> set[str]:
    return {s for a in cli.build_parser()._actions for s in a.option_strings if s.startswith("--")}


def test_every_tritonserver_flag_is_in_the_table_and_the_parser() -> None:
    missing = {f"--{n}" for n in TRITONSERVER_FLAGS} - parser_flags()
    assert not missing, f"tritonserver flags the parser does not know: {sorted(missing)}"
    assert set(flags.BY_NAME) >= {f"--{n}" for n in TRITONSERVER_FLAGS}


def test_every_parser_action_has_help() -> None:
    for action in cli.build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings


def test_every_ignored_or_refused_flag_says_why_in_help() -> None:
    text = re.sub(r"\s+", "", cli.build_parser().format_help())  # help wraps at hyphens too
    for flag in flags.FLAGS:
        if flag.rule is not None:
            assert re.sub(r"\s+", "", flag.rule.why) in text, flag.name


def test_the_doc_table_is_fresh() -> None:
    text = DOC.read_text()
    assert flags_doc.render(text) == text, "docs/flags.md is stale: run `make flags-doc`"


def test_the_doc_and_the_parser_name_the_same_flags() -> None:
    text = DOC.read_text()
    table = text[text.index(flags.DOC_BEGIN) : text.index(flags.DOC_END)]
    in_table = set(re.findall(r"`(--[a-z][a-z0-9-]*)`", table))
    assert in_table == parser_flags()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", text))
    assert mentioned <= parser_flags(), f"the doc names unknown flags: {mentioned - parser_flags()}"


def test_tritonservers_whole_command_line_parses(tmp_path: Path) -> None:
    """Every tritonserver flag at once, with values tritonserver takes: nothing is unknown, and
    each ignored flag is named in exactly one warning line."""
    argv = ["--model-store", str(tmp_path), "--model-repository", str(tmp_path)]
    for name in TRITONSERVER_FLAGS:
        if name in NOT_ON_ONE_LINE:
            continue
        if name in VALUES:
            argv.append(f"--{name}={VALUES[name]}")
        elif name == "disable-auto-complete-config":
            argv.append(f"--{name}")
        else:
            argv.append(f"--{name}={BOOL_VALUES.get(name, 'false')}")
    options = cli.parse_args(argv)
    assert options.model_control_mode == "explicit"
    assert options.grpc_infer_response_compression_level == "low"
    assert options.default_max_batch_size == 8
    assert options.log_format == "ISO8601"
    assert (options.grpc_max_connection_age_ms, options.grpc_max_connection_age_grace_ms) == (
        60000,
        5000,
    )
    warned = " ".join(options.warnings)
    for flag in flags.FLAGS:
        if flag.status == flags.IGNORED and flag.name[2:] in TRITONSERVER_FLAGS:
            assert warned.count(f"{flag.name}=") == 1, flag.name
    assert "--rate-limit-resource=R1:10:0" in warned
    assert len(options.warnings) == len({w.split(": ", 1)[-1] for w in options.warnings})


def test_kserve_command_line_is_one_warning(tmp_path: Path) -> None:
    options = cli.parse_args(
        [
            f"--model-store={tmp_path}",
            "--grpc-port=9000",
            "--http-port=8080",
            "--allow-grpc=true",
            "--allow-http=true",
        ]
    )
    assert options.model_repositories == [tmp_path]
    assert options.grpc_port == 9000
    assert options.allow_http is True
    assert options.http_port == 8080
    assert options.warnings == []


def test_http_flags_have_tritonservers_defaults(tmp_path: Path) -> None:
    options = cli.parse_args([f"--model-repository={tmp_path}"])
    assert (options.allow_http, options.http_port, options.http_address) == (True, 8000, "0.0.0.0")
    assert options.http_max_input_size == 64 << 20
    assert options.http_restricted_apis == {}
    options = cli.parse_args(
        [
            f"--model-repository={tmp_path}",
            "--allow-http=false",
            "--http-restricted-api=model-repository,statistics:Admin-Key=secret",
        ]
    )
    assert options.allow_http is False
    restriction = options.http_restricted_apis["statistics"]
    assert restriction.header == "admin-key"  # the key itself, no gRPC prefix
    assert restriction.allows_values(["secret"]) and not restriction.allows_values(["x"])


@pytest.mark.parametrize(
    ("text", "level"), [("0", 0), ("1", 1), ("3", 3), ("true", 1), ("TRUE", 1), ("false", 0)]
)
def test_log_verbose_takes_levels_and_booleans(text: str, level: int) -> None:
    assert flags.verbosity(text) == level


@pytest.mark.parametrize("text", ["-1", "yes", "1.5", ""])
def test_log_verbose_refuses_other_values(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        flags.verbosity(text)


def test_grpc_core_verbosity_is_a_default_the_environment_overrides(monkeypatch) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    logs.grpc_core_verbosity(0)
    assert __import__("os").environ["GRPC_VERBOSITY"] == "ERROR"
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    logs.grpc_core_verbosity(0)
    assert __import__("os").environ["GRPC_VERBOSITY"] == "DEBUG"
    for verbose, level in ((1, "ERROR"), (2, "INFO"), (3, "DEBUG")):
        monkeypatch.delenv("GRPC_VERBOSITY")
        logs.grpc_core_verbosity(verbose)
        assert __import__("os").environ["GRPC_VERBOSITY"] == level


def test_cache_config_sets_the_local_cache_size(tmp_path: Path) -> None:
    base = ["--model-repository", str(tmp_path)]
    assert cli.parse_args(base).cache_bytes == 0
    assert cli.parse_args([*base, "--cache-config", "local,size=4096"]).cache_bytes == 4096
    assert cli.parse_args([*base, "--response-cache-byte-size=512"]).cache_bytes == 512


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cache-config=local,size=1", "--response-cache-byte-size=1"], "Incompatible flags"),
        (["--cache-config=local,size=1", "--cache-config=redis,host=x"], "multiple cache"),
        (["--cache-config=redis,host=localhost"], "only the 'local' cache"),
        (["--cache-config=local,size=lots"], "number of bytes"),
        (["--cache-config=local,size=-5"], "between 0 and"),
        (["--cache-config=local,colour=red"], "unknown setting"),
        (["--cache-config=local"], "<setting>=<value>"),
        (["--cache-config=size=5"], "<cache name>,<setting>=<value>"),
    ],
)
def test_cache_config_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--model-repository", str(tmp_path), *argv])
    assert info.value.code == 2
    assert says in capsys.readouterr().err
