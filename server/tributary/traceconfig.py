"""--trace-config and the deprecated --trace-* flags, parsed as tritonserver parses them.

Pure (no grpc: the command line is parsed before grpc is first imported, see
`logs.grpc_core_verbosity`). The settings at run time are `tributary.tracesettings`; what they
mean is in docs/protocol.md#tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .constants import INT32_MAX

TIMESTAMPS = "TIMESTAMPS"
TENSORS = "TENSORS"
LEVELS = (TIMESTAMPS, TENSORS)
TRITON = "triton"
OPENTELEMETRY = "opentelemetry"
MODES = (TRITON, OPENTELEMETRY)
UINT32_MAX = 2**32 - 1
MIN_COUNT = -1
DEFAULT_URL = "localhost:4317"
DEFAULT_SERVICE_NAME = "tributary"
MAX_VALUE_CHARS = 4096
"""Longest --trace-config value (a URL, a resource attribute) we take."""


@dataclass(frozen=True)
class TraceConfig:
    """What the command line says (--trace-config and the deprecated --trace-* flags)."""

    mode: str = TRITON
    level: frozenset[str] = frozenset()  # empty: OFF
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0
    file: str = ""
    url: str = DEFAULT_URL
    resource: tuple[tuple[str, str], ...] = ()
    bsp_max_queue_size: int = 2048
    bsp_schedule_delay: int = 5000
    bsp_max_export_batch_size: int = 512
    # the mode's settings as given, reported by TraceSetting (Triton lists them there)
    mode_settings: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()


def parse_level(text: str) -> frozenset[str] | None:
    """tritonserver's level words: None means OFF (false/off), else the levels it adds."""
    word = text.strip().lower()
    if word in ("false", "off"):
        return None
    if word in ("true", "on", "min", "max", "timestamps"):
        return frozenset({TIMESTAMPS})
    if word == "tensors":
        return frozenset({TENSORS})
    raise ValueError(f"invalid value for trace level option: {text}")


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got '{text}'") from None
    if not low <= value <= high:
        raise ValueError(f"expected a value in [{low}, {high}], got {value}")
    return value


def _mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in MODES:
        raise ValueError(
            f'invalid value for trace mode option: {text}. Available options are "triton" and '
            '"opentelemetry"'
        )
    return mode


def split_entry(entry: str) -> tuple[str, str, str]:
    """`[<mode>,]<setting>=<value>` into (mode or "", setting, value), Triton's checks."""
    head, eq, value = entry.partition("=")
    mode, comma, setting = head.rpartition(",") if "," in head else ("", "", head)
    if comma and not mode:
        raise ValueError(
            "No trace mode specified. --trace-config option format is <trace mode>,"
            f"<setting>=<value> or <setting>=<value>. Got {entry}"
        )
    if not eq or not setting or not value:
        raise ValueError(
            f"--trace-config option format is '<trace mode>,<setting>=<value>'. Got {entry}"
        )
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"--trace-config {setting}: value longer than {MAX_VALUE_CHARS}")
    return (_mode(mode) if mode else ""), setting, value


DEPRECATED = {
    "--trace-file": "triton,file=<path>",
    "--trace-level": "level=<level>",
    "--trace-rate": "rate=<N>",
    "--trace-count": "count=<N>",
    "--trace-log-frequency": "triton,log-frequency=<N>",
}
"""tritonserver's deprecated trace flags and what replaces each (still taken, as there)."""


def parse_config(
    entries: Sequence[str],
    *,
    file: str | None = None,
    levels: Sequence[str] = (),
    rate: int | None = None,
    count: int | None = None,
    log_frequency: int | None = None,
) -> TraceConfig:
    """--trace-config entries plus the deprecated --trace-file/-level/-rate/-count/
    -log-frequency, which --trace-config overrides where both are given, as in tritonserver.
    Raises ValueError with the line to print."""
    given = {
        "--trace-file": file,
        "--trace-level": levels or None,
        "--trace-rate": rate,
        "--trace-count": count,
        "--trace-log-frequency": log_frequency,
    }
    warnings = [
        f"'{flag}' is deprecated (as in tritonserver): use --trace-config {DEPRECATED[flag]}"
        for flag, value in given.items()
        if value is not None
    ]
    cfg = TraceConfig(file=file or "")
    if rate is not None:
        cfg = replace(cfg, rate=_checked("--trace-rate", str(rate), 0, UINT32_MAX))
    if count is not None:
        cfg = replace(cfg, count=_checked("--trace-count", str(count), MIN_COUNT, INT32_MAX))
    if log_frequency is not None:
        frequency = _checked("--trace-log-frequency", str(log_frequency), 0, UINT32_MAX)
        cfg = replace(cfg, log_frequency=frequency)
    level: set[str] = set()
    off = False
    for text in levels:
        parsed = parse_level(text)
        off |= parsed is None
        level |= parsed or set()
    modes: dict[str, list[tuple[str, str]]] = {TRITON: [], OPENTELEMETRY: []}
    for entry in entries:
        mode, setting, value = split_entry(entry)
        if mode:
            modes[mode].append((setting, value))
            continue
        try:
            if setting == "rate":
                cfg = replace(cfg, rate=_int(value, 0, UINT32_MAX))
            elif setting == "count":
                cfg = replace(cfg, count=_int(value, MIN_COUNT, INT32_MAX))
            elif setting == "level":
                parsed = parse_level(value)
                off |= parsed is None
                level |= parsed or set()
            elif setting == "mode":
                cfg = replace(cfg, mode=_mode(value))
            else:
                raise ValueError("unknown global setting (rate, level, count, mode)")
        except ValueError as exc:
            raise ValueError(f'Bad option: "--trace-config {setting}". {exc}') from None
    cfg = replace(cfg, level=frozenset() if off else frozenset(level))
    if cfg.mode == TRITON:
        cfg = _triton_settings(cfg, modes[TRITON])
    else:
        cfg = _otel_settings(cfg, modes[OPENTELEMETRY])
        if file is not None or log_frequency is not None:
            warnings.append(
                "'--trace-file' and '--trace-log-frequency' are ignored in opentelemetry mode"
            )
    if cfg.mode == TRITON and cfg.level and not cfg.file:
        warnings.append(
            "trace level is set but mode triton has no file (--trace-config triton,file=<path>): "
            "no request is traced"
        )
    other = OPENTELEMETRY if cfg.mode == TRITON else TRITON
    if modes[other]:
        names = ", ".join(f"{other},{s}" for s, _ in modes[other])
        warnings.append(f"ignoring --trace-config {names}: the trace mode is {cfg.mode}")
    return replace(cfg, warnings=tuple(warnings))


def _checked(flag: str, text: str, low: int, high: int) -> int:
    try:
        return _int(text, low, high)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _triton_settings(cfg: TraceConfig, given: list[tuple[str, str]]) -> TraceConfig:
    for setting, value in given:
        where = f'Bad option: "--trace-config triton,{setting}".'
        if setting == "file":
            cfg = replace(cfg, file=value)
        elif setting == "log-frequency":
            try:
                cfg = replace(cfg, log_frequency=_int(value, 0, UINT32_MAX))
            except ValueError as exc:
                raise ValueError(f"{where} {exc}") from None
        else:
            raise ValueError(f"{where} unknown setting (file, log-frequency)")
    return cfg


_BSP = ("bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size")


def _otel_settings(cfg: TraceConfig, given: list[tuple[str, str]]) -> TraceConfig:
    resource: list[tuple[str, str]] = []
    shown: list[tuple[str, str]] = []
    for setting, value in given:
        where = f'Bad option: "--trace-config opentelemetry,{setting}".'
        if setting == "url":
            cfg = replace(cfg, url=value)
        elif setting == "resource":
            key, eq, val = value.partition("=")
            if not eq or not key:
                raise ValueError(f"{where} expected resource=<key>=<value>, got '{value}'")
            resource.append((key, val))
        elif setting in _BSP:
            try:
                number = _int(value, 1, UINT32_MAX)
            except ValueError as exc:
                raise ValueError(f"{where} {exc}") from None
            numbers = {setting: number}
            cfg = replace(cfg, **numbers)  # type: ignore[arg-type]
            continue  # reported below with the defaults
        else:
            raise ValueError(
                f"{where} unknown setting (url, resource, bsp_max_queue_size, "
                "bsp_schedule_delay, bsp_max_export_batch_size)"
            )
        shown.append((setting, value))
    if cfg.bsp_max_export_batch_size > cfg.bsp_max_queue_size:
        raise ValueError(
            "--trace-config opentelemetry,bsp_max_export_batch_size must be <= bsp_max_queue_size"
        )
    if not any(s == "url" for s, _ in shown):
        shown.insert(0, ("url", cfg.url))
    shown += [(s, str(getattr(cfg, s))) for s in _BSP]
    return replace(cfg, resource=tuple(resource), mode_settings=tuple(shown))
