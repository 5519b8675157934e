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
from .config_check import RefusedConfig
from .errors import (
    InferenceError,
    InvalidArgument,
    ModelLoadError,
    Unavailable,
    Unimplemented,
    shown,
)
from .overrides import FILE_PREFIX, OverrideDirs, check_model_name, poll_failed
from .repository import KeyedLocks, ModelRepository

log = logging.getLogger("tributary.control")

POLLING_ENABLED = "explicit model load / unload is not allowed if polling is enabled"
CONFIG_REQUIRED = "Load parameter 'config' must be specified for model file override"


def _check_repository_name(repository_name: str) -> None:
    if repository_name:
        raise Unimplemented("'repository_name' specification is not supported")


def _load_parameters(parameters: Mapping[str, Any]) -> tuple[str | None, dict[str, bytes]]:
    """Validate keys and value types the way Triton's gRPC front end does, before the mode check.

    Returns the `config` JSON (None when absent) and the `file:` parameters' bytes by key.
    """
    config: str | None = None
    files: dict[str, bytes] = {}
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
            files[key] = value.bytes_param
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
        raise poll_failed(name) from exc


class ModelControl:
    """Explicit-mode load/unload over one repository; `on_change` refreshes health afterwards."""

    def __init__(
        self, repository: ModelRepository, *, explicit: bool, on_change: Callable[[], None]
    ) -> None:
        self._repo = repository
        self._explicit = explicit
        self._on_change = on_change
        self.overrides = OverrideDirs()
        # Loads of one model are serialised anyway (the repository's operation lock); these
        # also cover the override directories' bookkeeping around them. An entry lives only
        # while it is held, so clients' names (any number, up to megabytes) leave nothing.
        self._name_locks = KeyedLocks()

    def load(self, request: Any) -> None:
        """Load, or reload when already loaded; blocks until done, like Triton."""
        _check_repository_name(request.repository_name)
        config, files = _load_parameters(request.parameters)
        if not self._explicit:
            raise Unavailable(POLLING_ENABLED)
        name = request.model_name
        reserved = 0  # live override bytes check() reserved; write() takes them over
        if files:
            check_model_name(name)  # it becomes a directory name
            if config is None:
                log.error(
                    "failed to load model %r: %s",
                    shown(name),
                    CONFIG_REQUIRED,
                    extra={"model": shown(name)},
                )
                raise poll_failed(name, CONFIG_REQUIRED)
            reserved = self.overrides.check(name, files)  # every limit and path, first
        try:
            override = parse_override(name, config) if config is not None else None
        except BaseException:
            self.overrides.release(reserved)
            raise
        if not files and name not in self._repo.model_names():
            log.error(
                "failed to load model %r: no such directory in the model repository",
                shown(name),
                extra={"model": shown(name)},
            )
            raise poll_failed(name)
        with self._name_locks.hold(name):
            model_dir = self.overrides.write(name, files, reserved) if files else None
            before = self._serving(name)
            try:
                self._repo.load(name, override=override, model_dir=model_dir)
            except ModelLoadError as exc:
                # A version failed: its previous instance (and directory) keeps serving. The
                # new directory stays only if some version now serves from it; otherwise it
                # would hold its bytes against the live-bytes bound until the next unload.
                if model_dir is not None and (
                    isinstance(exc, RefusedConfig) or not self._serves_new(name, before)
                ):
                    self.overrides.discard(name, model_dir)  # no version came from it
                raise
            except BaseException:
                if model_dir is not None:
                    self.overrides.discard(name, model_dir)
                raise
            else:
                self.overrides.loaded(name, model_dir, in_use=False)
            finally:
                self._on_change()  # even a failed reload can change readiness

    def _serving(self, name: str) -> list[Any]:
        """The READY instances of `name` (held, so their ids stay unique while compared)."""
        try:
            return list(self._repo.ready_versions(name))
        except InferenceError:
            return []

    def _serves_new(self, name: str, before: list[Any]) -> bool:
        """Whether a READY instance of `name` is not one of `before`: the load just made it.

        Loads of one name run under its name lock, so nothing else made it."""
        old = {id(s) for s in before}
        return any(id(s) not in old for s in self._serving(name))

    def unload(self, request: Any) -> None:
        """Unload every version; returns once in-flight work on them has finished."""
        _check_repository_name(request.repository_name)
        dependents = False
        for key, value in request.parameters.items():
            if key != "unload_dependents":
                raise InvalidArgument(f"unrecognized unload parameter '{shown(key)}'.")
            if value.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(
                    "invalid value type for 'unload_dependents' parameter, expected bool_param."
                )
            dependents = value.bool_param  # an ensemble's composing models go too
        if not self._explicit:
            raise Unavailable(POLLING_ENABLED)
        try:
            with self._name_locks.hold(request.model_name):
                self._repo.unload(request.model_name, dependents=dependents)
                self.overrides.unloaded(request.model_name)
        finally:
            self._on_change()
        name = shown(request.model_name)
        log.info("unloaded model %r", name, extra={"model": name})

    def close(self) -> None:
        """Shutdown, after the repository closed: the override directories go."""
        self.overrides.close()
