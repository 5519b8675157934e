"""RepositoryModelLoad / RepositoryModelUnload: Triton's explicit model control.

The rules are in docs/protocol.md#repository-rpcs.

Kept apart from the servicer because the rules are fiddly and clients match the texts: which
parameters exist and what type each must be, the order Triton checks things in (repository
name, parameter syntax, control mode, then the config JSON), and which failures read as
"failed to poll from model repository". The repository does the actual loading; this module
only turns a request into a `load(name, override=...)` or `unload(name)` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import json_format

from tributary_client._proto import model_config_pb2 as mc

from .config import MAX_CONFIG_FILE_BYTES
from .errors import Internal, InvalidArgument, Unavailable, Unimplemented, shown
from .repository import ModelRepository

log = logging.getLogger("tributary.control")

POLLING_ENABLED = "explicit model load / unload is not allowed if polling is enabled"
FILE_PREFIX = "file:"


def _poll_failed(name: str) -> Internal:
    """What Triton answers for anything that goes wrong before a model's versions are tried."""
    return Internal(f"failed to load '{shown(name)}', failed to poll from model repository")


def _check_repository_name(repository_name: str) -> None:
    if repository_name:
        raise Unimplemented("'repository_name' specification is not supported")


def _load_parameters(parameters: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Validate keys and value types the way Triton's gRPC front end does, before the mode check.

    Returns the `config` JSON (None when absent) and the names of `file:` parameters.
    """
    config: str | None = None
    files: list[str] = []
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidArgument(
                    "invalid value type for load parameter 'config', expected string_param."
                )
            config = value.string_param
        elif key.startswith(FILE_PREFIX):
            if kind != "bytes_param":
                raise InvalidArgument(
                    f"invalid value type for load parameter '{shown(key)}', expected bytes_param."
                )
            files.append(key)
        else:
            raise InvalidArgument(f"unrecognized load parameter '{shown(key)}'.")
    return config, files


def parse_override(name: str, text: str) -> mc.ModelConfig:
    """The `config` parameter as a ModelConfig, with protobuf-JSON rules (int64 as strings).

    A bad override is the client's mistake, but Triton reports it as a failed poll and only
    logs the reason; clients (and Triton's own CI) look for both texts.
    """
    if len(text) > MAX_CONFIG_FILE_BYTES or len(text.encode()) > MAX_CONFIG_FILE_BYTES:
        raise InvalidArgument(
            f"config override for model '{shown(name)}' is larger than "
            f"{MAX_CONFIG_FILE_BYTES} bytes, the limit for a model configuration"
        )
    try:
        return json_format.Parse(text, mc.ModelConfig())
    except json_format.Error as exc:
        log.error(
            "failed to load model %r: Invalid config override: %s",
            shown(name),
            exc,
            extra={"model": shown(name)},
        )
        raise _poll_failed(name) from exc


class ModelControl:
    """Explicit-mode load/unload over one repository; `on_change` refreshes health afterwards."""

    def __init__(
        self, repository: ModelRepository, *, explicit: bool, on_change: Callable[[], None]
    ) -> None:
        self._repo = repository
        self._explicit = explicit
        self._on_change = on_change

    def load(self, request: Any) -> None:
        """Load, or reload when already loaded; blocks until done, like Triton."""
        _check_repository_name(request.repository_name)
        config, files = _load_parameters(request.parameters)
        if not self._explicit:
            raise Unavailable(POLLING_ENABLED)
        name = request.model_name
        override = parse_override(name, config) if config is not None else None
        if files:
            # Triton writes these into a temporary model directory; we do not build one, so
            # the load fails exactly as Triton's does when it cannot write that directory.
            log.error(
                "failed to load model %r: model file overrides (%r) are not supported",
                shown(name),
                shown(files[0], 64),
                extra={"model": shown(name)},
            )
            raise _poll_failed(name)
        if name not in self._repo.model_names():
            log.error(
                "failed to load model %r: no such directory in the model repository",
                shown(name),
                extra={"model": shown(name)},
            )
            raise _poll_failed(name)
        try:
            self._repo.load(name, override=override)
        finally:
            self._on_change()  # even a failed reload can change readiness (a failed version)

    def unload(self, request: Any) -> None:
        """Unload every version; returns once in-flight work on them has finished."""
        _check_repository_name(request.repository_name)
        for key, value in request.parameters.items():
            if key != "unload_dependents":
                raise InvalidArgument(f"unrecognized unload parameter '{shown(key)}'.")
            if value.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(
                    "invalid value type for 'unload_dependents' parameter, expected bool_param."
                )
            # No ensembles here, so no model depends on another: nothing more to unload.
        if not self._explicit:
            raise Unavailable(POLLING_ENABLED)
        try:
            self._repo.unload(request.model_name)
        finally:
            self._on_change()
        name = shown(request.model_name)
        log.info("unloaded model %r", name, extra={"model": name})
