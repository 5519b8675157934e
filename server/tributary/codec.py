"""ModelInferRequest -> WorkItem (validated once), and results -> ModelInferResponse.

This is where a request meets a model's signature: unknown/missing/duplicate inputs, datatype,
shape against `dims` (with -1) and `max_batch_size`, raw/typed mixing, byte sizes, requested
outputs and their parameters. Every rejection names the model, the tensor and what was
expected, in Triton's wording where clients assert on it (docs/protocol.md). After this the
scheduler and backend can trust the arrays they get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tributary_client._proto import grpc_service_pb2 as pb

from . import tensors
from .config import ModelSignature, TensorSpec
from .constants import INT32_MAX
from .datatypes import BY_NAME
from .errors import Internal, InvalidArgument, NotFound, shown
from .scheduler import SequenceFlags, WorkItem
from .shm import Leases, Region, SharedMemory

MAX_TIMEOUT_US = 365 * 24 * 3600 * 1_000_000
"""A request's `timeout` parameter is clamped to a year: Triton takes any uint64, and a longer
deadline is indistinguishable from none, but it must stay inside what clocks and waits accept."""
_KNOWN_TRITON_PARAMS = {"triton_enable_empty_final_response"}
_SHAPE_NOTE = (
    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
    "to be prepended to each input shape. If you want to specify the full shape including the "
    "batch dim in your input dims config, try setting max_batch_size to zero. See the model "
    "configuration docs for more info on max_batch_size."
)


@dataclass(frozen=True)
class ShmWindow:
    """Where a tensor lives in a registered shared memory region (bounds checked)."""

    region: Region
    offset: int
    byte_size: int

    def view(self) -> memoryview:
        return self.region.window(self.offset, self.byte_size)


@dataclass(frozen=True)
class RequestedOutput:
    spec: TensorSpec
    classification: int = 0  # top-k, 0 = plain tensor
    shm: ShmWindow | None = None  # written into shared memory instead of the reply


@dataclass
class DecodedRequest:
    item: WorkItem
    outputs: list[RequestedOutput]
    batched: bool
    leases: Leases | None = None  # shared memory regions the request uses

    def release(self) -> None:
        """Give back the request's shared memory regions: call once its reply is built (or it
        failed). Idempotent."""
        if self.leases is not None:
            self.leases.release()


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def _param_value(param: pb.InferParameter) -> tuple[str | None, Any]:
    kind = param.WhichOneof("parameter_choice")
    return kind, getattr(param, kind) if kind else None


MAX_PARAMETERS = 64
"""Request parameters looked at: Triton defines a handful; more is refused before the loop."""
MAX_SEQUENCE_ID_BYTES = 256
"""A string `sequence_id` is kept for the life of its sequence (and fed to a TYPE_STRING CORRID
control): Triton sets no bound, we refuse longer ones (UTF-8 bytes)."""
_UINT64 = (1 << 64) - 1


def _request_params(request: pb.ModelInferRequest) -> tuple[int, int, SequenceFlags | None]:
    """(priority, timeout_us, sequence) from request parameters; other keys are checked and
    passed over. `sequence` is None unless a sequence parameter is present."""
    if len(request.parameters) > MAX_PARAMETERS:
        raise InvalidArgument(
            f"a request may carry at most {MAX_PARAMETERS} parameters, got "
            f"{len(request.parameters)}"
        )
    priority = timeout_us = 0
    seq_id: int | str = 0
    start = end = has_seq = False
    for key, param in request.parameters.items():
        kind, value = _param_value(param)
        if key == "priority":
            if kind not in ("uint64_param", "int64_param") or value < 0:
                raise InvalidArgument(
                    "invalid value type for 'priority' parameter, expected uint64_param."
                )
            priority = int(value)
        elif key == "timeout":
            if kind != "int64_param" or value < 0:
                raise InvalidArgument(
                    "invalid value type for 'timeout' parameter, expected int64_param."
                )
            timeout_us = min(int(value), MAX_TIMEOUT_US)
        elif key == "sequence_id":
            if kind in ("int64_param", "uint64_param"):
                seq_id = int(value) & _UINT64  # Triton keeps it as uint64: -1 is 2**64-1
            elif kind == "string_param":
                if len(value) > MAX_SEQUENCE_ID_BYTES // 4 and (
                    len(value.encode("utf-8")) > MAX_SEQUENCE_ID_BYTES
                ):
                    raise InvalidArgument(
                        f"'sequence_id' parameter is longer than the server's limit of "
                        f"{MAX_SEQUENCE_ID_BYTES} bytes"
                    )
                seq_id = str(value)
            else:
                raise InvalidArgument(
                    "invalid value type for 'sequence_id' parameter, expected int64_param or "
                    "string_param."
                )
            has_seq = True
        elif key in ("sequence_start", "sequence_end"):
            if kind != "bool_param":
                raise InvalidArgument(
                    f"invalid value type for '{key}' parameter, expected bool_param."
                )
            has_seq = True
            if key == "sequence_start":
                start = bool(value)
            else:
                end = bool(value)
        elif key.startswith("triton_") and key not in _KNOWN_TRITON_PARAMS:
            raise InvalidArgument(
                "parameter keys starting with 'triton_' are reserved for Triton usage and should "
                "not be specified."
            )
    sequence = SequenceFlags(seq_id, start, end) if has_seq else None
    return priority, timeout_us, sequence


class _ShmUse:
    """The shared memory regions a request names, leased as they are found."""

    __slots__ = ("manager", "leases")

    def __init__(self, manager: SharedMemory | None) -> None:
        self.manager = manager
        self.leases: Leases | None = None

    def window(
        self,
        tensor: pb.ModelInferRequest.InferInputTensor
        | pb.ModelInferRequest.InferRequestedOutputTensor,
    ) -> ShmWindow | None:
        """The tensor's shared memory window, or None when it names no region. Parameter
        checks and texts are Triton's (docs/protocol.md#shared-memory)."""
        params = tensor.parameters
        name: str | None = None
        if "shared_memory_region" in params:
            kind, value = _param_value(params["shared_memory_region"])
            if kind != "string_param":
                raise InvalidArgument(
                    f"invalid value type for 'shared_memory_region' parameter for tensor "
                    f"'{shown(tensor.name)}', expected string_param."
                )
            name = value
        offset = _shm_int(params, "shared_memory_offset", name, tensor.name)
        if "shared_memory_byte_size" not in params:
            if name is None:
                return None
            raise InvalidArgument(
                f"'shared_memory_byte_size' must be specified along with "
                f"'shared_memory_region' parameter for tensor '{shown(tensor.name)}'"
            )
        byte_size = _shm_int(params, "shared_memory_byte_size", name, tensor.name)
        assert name is not None
        if self.manager is None:
            raise NotFound(f"Unable to find shared memory region: '{shown(name)}'")
        if self.leases is None:
            self.leases = self.manager.leases()
        region = self.leases.acquire(name)
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidArgument(
                f"Invalid offset + byte size for shared memory region: '{shown(name)}'"
            )
        return ShmWindow(region, offset, byte_size)

    def release(self) -> None:
        if self.leases is not None:
            self.leases.release()


def _shm_int(params: Any, key: str, region: str | None, tensor: str) -> int:
    if key not in params:
        return 0
    if region is None:
        raise InvalidArgument(
            f"'{key}' can not be specified without 'shared_memory_region' parameter for "
            f"tensor '{shown(tensor)}'"
        )
    kind, value = _param_value(params[key])
    if kind != "int64_param":
        raise InvalidArgument(
            f"invalid value type for '{key}' parameter for tensor '{shown(tensor)}', "
            "expected int64_param."
        )
    return int(value)


def _check_shape(
    spec: TensorSpec, shape: tuple[int, ...], sig: ModelSignature, request_id: str
) -> None:
    dims = spec.dims
    batched = sig.max_batch_size > 0
    body = shape[1:] if batched else shape
    ok = (not batched or len(shape) >= 1) and len(body) == len(dims)
    ok = ok and all(d == -1 or d == s for d, s in zip(dims, body, strict=False))
    if not ok:
        _shape_error(spec, shape, len(shape), sig, request_id)


def _shape_error(
    spec: TensorSpec, shape: tuple[int, ...], rank: int, sig: ModelSignature, request_id: str
) -> None:
    """Triton's text for a shape that does not match; `shape` may be a prefix of `rank`."""
    batched = sig.max_batch_size > 0
    expected = ((-1,) if batched else ()) + spec.dims
    raise InvalidArgument(
        f"{_prefix(request_id)}unexpected shape for input '{spec.name}' for model "
        f"'{sig.name}'. Expected {tensors.format_shape(expected)}, got "
        f"{tensors.format_shape(shape, rank)}." + (_SHAPE_NOTE if batched else "")
    )


def decode_request(
    request: pb.ModelInferRequest,
    sig: ModelSignature,
    *,
    max_tensor_bytes: int,
    is_active: Callable[[], bool] | None = None,
    raw: Sequence[bytes | memoryview] | None = None,
    shm: SharedMemory | None = None,
) -> DecodedRequest:
    """Validate a ModelInferRequest against the signature and build the scheduler's WorkItem.

    `raw` are the request's raw_input_contents when the caller split them off the wire
    (`tributary.wire`); None reads them from the message. `shm` holds the registered shared
    memory regions; the result leases those it names until `DecodedRequest.release`.
    """
    use = _ShmUse(shm)
    try:
        return _decode(request, sig, max_tensor_bytes, is_active, raw, use)
    except BaseException:
        use.release()
        raise


def _decode(
    request: pb.ModelInferRequest,
    sig: ModelSignature,
    max_tensor_bytes: int,
    is_active: Callable[[], bool] | None,
    raw: Sequence[bytes | memoryview] | None,
    use: _ShmUse,
) -> DecodedRequest:
    """The steps, in the order clients see their errors: request parameters, the raw count,
    each input (name, datatype, shape, batch, size), the required inputs, the data itself,
    then the requested outputs."""
    rid: str = shown(request.id)
    model = sig.name
    priority, timeout_us, sequence = (
        _request_params(request) if request.parameters else (0, 0, None)
    )
    if raw is None:
        raw = request.raw_input_contents
    batched = sig.max_batch_size > 0
    if len(raw) > len(request.inputs):
        raise InvalidArgument(
            f"{_prefix(rid)}expected {len(request.inputs)} raw_input_contents (one per input) "
            f"but got {len(raw)} for model '{model}'"
        )
    checked = [
        _check_input(tensor, sig, max_tensor_bytes, bool(raw), use, rid)
        for tensor in request.inputs
    ]
    batch = _common_batch(checked, sig)
    _check_required(request, checked, sig, rid)
    in_shm = sum(c.window is not None for c in checked)
    if in_shm and len(raw) > len(checked) - in_shm:
        raise InvalidArgument(
            f"{_prefix(rid)}expected {len(checked) - in_shm} raw_input_contents (one per input "
            f"not in shared memory) but got {len(raw)} for model '{model}'"
        )
    arrays = _input_arrays(checked, raw, sig, rid)
    outputs = _requested_outputs(request, sig, rid, use)
    item = WorkItem(
        inputs=arrays,
        rows=batch if batched and batch else 1,
        outputs=tuple(o.spec.name for o in outputs),
        priority=priority,
        timeout_us=timeout_us,
        is_active=is_active,
        request_id=rid,
        sequence=sequence,
    )
    return DecodedRequest(item=item, outputs=outputs, batched=batched, leases=use.leases)


class _Checked(NamedTuple):
    """One input that matched its signature entry (its data is not looked at yet)."""

    spec: TensorSpec
    tensor: pb.ModelInferRequest.InferInputTensor
    shape: tuple[int, ...]
    window: ShmWindow | None


def _check_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    sig: ModelSignature,
    max_tensor_bytes: int,
    has_raw: bool,
    use: _ShmUse,
    rid: str,
) -> _Checked:
    """Where the input's data comes from, its name, datatype, shape and size."""
    name, model = tensor.name, sig.name
    spec = sig.input(name)
    window = use.window(tensor) if tensor.parameters else None
    if window is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"unexpected 'content' provided when using shared memory for input tensor "
                f"'{shown(name)}' for model '{model}'"
            )
    elif has_raw and tensor.HasField("contents"):
        raise InvalidArgument(
            f"contents field must not be specified when using raw_input_contents for "
            f"'{shown(name)}' for model '{model}'"
        )
    if spec is None:
        raise InvalidArgument(f"unexpected inference input '{shown(name)}' for model '{model}'")
    if tensor.datatype != spec.dtype.name:
        raise InvalidArgument(
            f"{_prefix(rid)}inference input '{name}' data-type is '{shown(tensor.datatype)}', "
            f"but model '{model}' expects '{spec.dtype.name}'"
        )
    rank = len(tensor.shape)
    if rank > len(spec.dims) + 1:  # cannot match: don't build a tuple of a huge shape
        _shape_error(spec, tuple(tensor.shape[: tensors.MAX_SHOWN_DIMS]), rank, sig, rid)
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise InvalidArgument(
            f"All input dimensions should be specified for input '{name}' for model "
            f"'{model}', got {tensors.format_shape(shape)}"
        )
    _check_shape(spec, shape, sig, rid)
    if sig.max_batch_size > 0 and (shape[0] > sig.max_batch_size or shape[0] < 1):
        raise InvalidArgument(
            f"{_prefix(rid)}inference request batch-size must be <= "
            f"{sig.max_batch_size} for '{model}'"
            + ("" if shape[0] else f", and at least 1 (input '{name}' has 0)")
        )
    tensors.check_size_limit(shape, spec.dtype, max_tensor_bytes, name, model)
    return _Checked(spec, tensor, shape, window)


def _common_batch(checked: list[_Checked], sig: ModelSignature) -> int | None:
    """Every input's first dimension is the same batch size (models with a batch dim)."""
    if sig.max_batch_size <= 0:
        return None
    batch: int | None = None
    for c in checked:
        if batch is not None and c.shape[0] != batch:
            raise InvalidArgument(
                f"input '{c.spec.name}' batch size does not match other inputs for '{sig.name}'"
            )
        batch = c.shape[0]
    return batch


def _check_required(
    request: pb.ModelInferRequest, checked: list[_Checked], sig: ModelSignature, rid: str
) -> None:
    """No input twice, and every non-optional input present."""
    seen: set[str] = set()
    for c in checked:
        if c.spec.name in seen:
            raise InvalidArgument(f"{_prefix(rid)}input '{c.spec.name}' already exists in request")
        seen.add(c.spec.name)
    required = [s.name for s in sig.inputs if not s.optional]
    missing = [n for n in required if n not in seen]
    if missing:
        got = [shown(t.name) for t in request.inputs]
        total = len(sig.inputs)
        expected = (
            f"expected {total} inputs"
            if len(required) == total
            else f"expected number of inputs between {len(required)} and {total}"
        )
        raise InvalidArgument(
            f"{_prefix(rid)}{expected} but got {len(got)} inputs for model '{sig.name}'. Got "
            f"input(s) {got}, but missing required input(s) {missing}. Please provide all "
            "required input(s)."
        )


def _input_arrays(
    checked: list[_Checked],
    raw: Sequence[bytes | memoryview],
    sig: ModelSignature,
    rid: str,
) -> dict[str, np.ndarray]:
    """Each input's data as a numpy array: a view of its raw bytes or shared memory window,
    or converted from typed contents."""
    model, batched = sig.name, sig.max_batch_size > 0
    arrays: dict[str, np.ndarray] = {}
    next_raw = 0  # raw buffers belong, in order, to the inputs not in shared memory
    for spec, tensor, shape, window in checked:
        if window is not None:
            arr = tensors.raw_to_numpy(window.view(), spec.dtype, shape, spec.name, model, rid)
            if arr.flags.writeable:  # the client's memory: the server only reads it
                arr.flags.writeable = False
        elif raw:
            if next_raw >= len(raw):
                raise InvalidArgument(
                    f"unable to find data for input tensor '{spec.name}' for model '{model}' "
                    "in request."
                )
            arr = tensors.raw_to_numpy(raw[next_raw], spec.dtype, shape, spec.name, model, rid)
            next_raw += 1
        elif tensor.HasField("contents"):
            arr = tensors.typed_to_numpy(tensor.contents, spec.dtype, shape, spec.name, model, rid)
        else:
            raise InvalidArgument(
                f"unable to find data for input tensor '{spec.name}' for model '{model}' "
                "in request."
            )
        if spec.reshape is not None:
            arr = arr.reshape(((shape[0],) if batched else ()) + spec.reshape)
        arrays[spec.name] = arr
    return arrays


def _requested_outputs(
    request: pb.ModelInferRequest, sig: ModelSignature, rid: str, use: _ShmUse
) -> list[RequestedOutput]:
    asked = request.outputs
    if not asked:
        return [RequestedOutput(spec) for spec in sig.outputs]
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for out in asked:
        spec = sig.output(out.name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected inference output '{shown(out.name)}' for model '{sig.name}'"
            )
        if out.name in seen:
            raise InvalidArgument(f"{_prefix(rid)}output '{out.name}' already exists in request")
        seen.add(out.name)
        k = 0
        if "classification" in out.parameters:
            kind, value = _param_value(out.parameters["classification"])
            if kind != "int64_param" or value <= 0:
                raise InvalidArgument(
                    "invalid value type for 'classification' parameter, expected int64_param"
                )
            if "shared_memory_region" in out.parameters:
                raise InvalidArgument(
                    "output can't set both 'shared_memory_region' and 'classification'"
                )
            k = int(value)
        window = use.window(out) if out.parameters else None
        result.append(RequestedOutput(spec, k, window))
    return result


def encode_response(
    response: pb.ModelInferResponse,
    decoded: DecodedRequest,
    results: dict[str, np.ndarray],
    model: str,
) -> list[bytes | memoryview]:
    """Fill a ModelInferResponse's output entries and return one raw buffer per output, same
    order. The buffers are contiguous arrays or bytes, appended as raw_output_contents by
    `tributary.wire` (numeric outputs are not copied until the response is assembled)."""
    raws: list[bytes | memoryview] = []
    total = 0
    for req in decoded.outputs:
        spec = req.spec
        arr = results[spec.name]
        if req.classification:
            arr = tensors.classify(
                arr, req.classification, spec.labels, decoded.batched, spec.name, model
            )
            datatype = BY_NAME["BYTES"]
        else:
            datatype = spec.dtype
            if spec.reshape is not None:
                lead = (arr.shape[0],) if decoded.batched else ()
                arr = arr.reshape(lead + spec.dims)
        out = response.outputs.add()
        out.name = spec.name
        out.datatype = datatype.name
        out.shape.extend(arr.shape)
        data: bytes | memoryview
        if datatype.name == "BYTES":
            data = tensors.serialize_bytes(arr)
        else:
            if arr.dtype != datatype.numpy:
                arr = arr.astype(datatype.numpy)
            data = np.ascontiguousarray(arr).data  # a view of the array; no copy yet
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if req.shm is not None:
            _write_shm(req.shm, data, size, spec.name)
            raws.append(b"")  # keeps raw_output_contents aligned with outputs
            continue
        total += size
        raws.append(data)
    if total > INT32_MAX:
        raise InvalidArgument(
            f"Response has byte size {total} which exceeds gRPC's byte size limit {INT32_MAX}."
        )
    return raws


def _write_shm(window: ShmWindow, data: bytes | memoryview, size: int, output: str) -> None:
    """Copy one output's bytes (BYTES: length-prefixed) into its shared memory window."""
    if size > window.byte_size:
        raise Internal(
            f"shared memory size specified with the request for output '{output}' "
            f"({window.byte_size} bytes) should be at least {size} bytes to hold the results"
        )
    if size:
        dst = np.frombuffer(window.region.window(window.offset, size), dtype=np.uint8)
        dst[:] = np.frombuffer(data, dtype=np.uint8)
