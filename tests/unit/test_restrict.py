"""--grpc-restricted-protocol parsing and the method -> category table (tributary.restrict)."""

from __future__ import annotations

import argparse

import pytest

from tributary import cli
from tributary.restrict import CATEGORIES, METHOD_CATEGORY, by_category, parse_restriction
from tributary.servicer import InferenceServicer
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc


def test_every_served_method_has_a_category() -> None:
    methods = {n for n in dir(pb_grpc.GRPCInferenceServiceServicer) if n[0].isupper()}
    assert methods <= set(METHOD_CATEGORY), methods - set(METHOD_CATEGORY)
    assert {"Check", "Watch"} <= set(METHOD_CATEGORY)
    assert set(METHOD_CATEGORY.values()) == set(CATEGORIES)
    assert all(hasattr(InferenceServicer, m) for m in methods)


def test_parse() -> None:
    r = parse_restriction("health,inference:admin-key=admin value")
    assert r.categories == ("health", "inference")
    assert r.header == "triton-grpc-protocol-admin-key" and r.value == "admin value"
    assert r.message == (
        "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
    )
    assert set(by_category([r])) == {"health", "inference"}


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("health", "expected <categories>:<key>=<value>"),
        ("health:key", "expected <categories>:<key>=<value>"),
        (":k=v", "categories separated by commas"),
        ("health,,metadata:k=v", "categories separated by commas"),
        ("helth:k=v", "unknown restricted protocol 'helth'"),
        ("health,health:k=v", "named twice"),
        ("health:=v", "header key ''"),
        ("health:Key=v", "header key 'Key'"),
        ("health:k-bin=v", "not ending in '-bin'"),
        ("health:k=", "header value"),
        ("health:k=a\nb", "header value"),
    ],
)
def test_parse_errors(text: str, mentions: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse_restriction(text)
    assert mentions in str(info.value)
    assert "\n" not in str(info.value)


def test_a_category_in_two_groups_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(
            [
                "--model-repository=.",
                "--grpc-restricted-protocol=health,metadata:a=1",
                "--grpc-restricted-protocol=metadata:b=2",
            ]
        )
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "tributary: error: --grpc-restricted-protocol: restricted protocol 'metadata' can not be "
        "specified in multiple config groups (see tributary --help)"
    )


def test_options_carry_the_restrictions() -> None:
    options = cli.parse_args(
        ["--model-repository=.", "--grpc-restricted-protocol=model-repository:admin=s3cret"]
    )
    restriction = options.grpc_restricted_protocols["model-repository"]
    assert restriction.header == "triton-grpc-protocol-admin"
    assert cli.parse_args(["--model-repository=."]).grpc_restricted_protocols == {}


class Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def test_the_header_must_be_sent_once_with_the_value() -> None:
    r = parse_restriction("health:admin=s3cret")
    key = "triton-grpc-protocol-admin"
    assert r.allows(Context((key, "s3cret"), ("other", "x")))
    assert not r.allows(Context())
    assert not r.allows(Context((key, "wrong")))
    assert not r.allows(Context((key, "s3cret2")))
    # Triton looks up one entry: a second copy is refused, whichever of them matches
    assert not r.allows(Context((key, "wrong"), (key, "s3cret")))
    assert not r.allows(Context((key, "s3cret"), (key, "s3cret")))
