"""Pure translation between HTTP/REST v2 bodies and the data plane's protobuf messages.

Nothing here does I/O or keeps state: `tributary.http.routes` hands in bodies and gets back
messages (to the data plane) or JSON-ready values and bytes (to the client). Each function
raises `InvalidArgument` with a message that names the offending field, so a malformed body
is a 400 with a reason, never a 500 (docs/protocol.md#httprest).

The infer body follows Triton's binary tensor data extension: the first
`Inference-Header-Content-Length` bytes are the JSON head, the rest is the inputs'
`binary_data_size` slices in input order. Those slices are handed on as memoryviews of the
body (no copy); JSON `data` arrays are converted once, by numpy, into the same raw bytes a
gRPC client would have sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tributary_client._proto import grpc_service_pb2 as pb

from ..datatypes import BY_NAME
from ..errors import InferenceError, InvalidArgument, shown

MAX_DIMS = 64
MAX_JSON_HEAD = 8 << 20
"""The JSON part of an infer body, at most (gRPC's bound on what a request carries besides its
raw payloads, docs/limits.md#httprest). Python's JSON parser and numpy's list conversion hold
the GIL throughout, ~55 ms per MiB of numbers: a 60 MB `data` array stalled the whole
process, gRPC included, for 3.3 s. Large tensors go as binary data, which is not parsed."""
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

BINARY_DATA = "binary_data"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA_OUTPUT = "binary_data_output"
_HTTP_ONLY = {BINARY_DATA, BINARY_DATA_SIZE, BINARY_DATA_OUTPUT}
"""Parameters that steer this transport's encoding and are not forwarded to the data plane."""

# -- status codes -------------------------------------------------------------------------------

_HTTP_STATUS = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def http_status(error: InferenceError) -> int:
    """Triton's mapping of its error codes to HTTP: INTERNAL 500, NOT_FOUND 404, UNAVAILABLE
    503, UNSUPPORTED 501, every other code (invalid argument, already exists, cancelled,
    unknown) 400. Our codes beyond Triton's set (resource exhausted, deadline) are client-side
    conditions there too, so they take the 400 as well."""
    return _HTTP_STATUS.get(error.code, 400)


# -- JSON in ------------------------------------------------------------------------------------


def parse_json(text: bytes | memoryview, what: str = "request body") -> Any:
    """JSON from a client; any failure is a 400. Nesting is bounded by the parser itself:
    it raises RecursionError at the interpreter's recursion limit (1,000 levels) rather than
    overflowing the stack, and numpy refuses arrays deeper than 64 dimensions."""
    try:
        return json.loads(bytes(text))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidArgument(f"{what}: malformed JSON: {reason}") from None


def json_object(text: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    """An optional JSON object body (empty means {})."""
    if not len(text) or not bytes(text).strip():
        return {}
    value = parse_json(text, what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: expected a JSON object")
    return value


def _parameter(key: str, value: Any, where: str) -> pb.InferParameter:
    param = pb.InferParameter()
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if INT64_MAX < value <= UINT64_MAX:
            # Triton's HTTP front end reads sequence_id and priority as uint64: ids of 2^63
            # and up are the ones a gRPC client sends as negative int64s
            param.uint64_param = value
        elif not -(2**63) <= value <= INT64_MAX:
            raise InvalidArgument(f"parameter '{shown(key)}' of {where} is out of int64 range")
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidArgument(
            f"parameter '{shown(key)}' of {where} has invalid type. It should be either "
            "'int', 'bool', or 'string'."
        )
    return param


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"'parameters' of {where} must be a JSON object")
    return raw


def _copy_parameters(target: Any, params: Mapping[str, Any], where: str) -> None:
    for key, value in params.items():
        if key not in _HTTP_ONLY:
            target[key].CopyFrom(_parameter(key, value, where))


def _shape(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMS:
        raise InvalidArgument(
            f"input '{shown(name)}': 'shape' must be a list of at most {MAX_DIMS} integers"
        )
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= INT64_MAX:
            raise InvalidArgument(
                f"input '{shown(name)}': 'shape' must hold non-negative integers, got {dim!r}"
            )
    return raw


def _flatten_strings(data: Any, name: str) -> Iterator[bytes]:
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidArgument(
                    f"input '{shown(name)}': BYTES 'data' must hold strings, got "
                    f"{type(item).__name__}"
                )
            yield item.encode("utf-8", "surrogatepass")
        else:
            stack.pop()


def json_data_to_raw(data: Any, datatype: str, shape: Sequence[int], name: str) -> bytes:
    """A JSON `data` array (flat or nested) as the raw bytes a gRPC client would send."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items = list(_flatten_strings(data, name))
        if len(items) != count:
            raise InvalidArgument(
                f"input '{shown(name)}': 'data' has {len(items)} elements but shape "
                f"{list(shape)} needs {count}"
            )
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    dtype = BY_NAME.get(datatype)
    if dtype is None or dtype.numpy is None:
        raise InvalidArgument(
            f"input '{shown(name)}': datatype '{shown(datatype)}' cannot be sent as JSON 'data'"
        )
    try:
        arr = np.asarray(data)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"expected {datatype} numbers, got {_kind(arr)}")
        if arr.dtype.kind == "f" and dtype.numpy.kind in "iu":
            raise TypeError(f"expected integers for {datatype}, got numbers with fractions")
        if dtype.numpy.kind == "b" and arr.dtype.kind != "b":
            raise TypeError(f"expected true/false, got {_kind(arr)}")
        if dtype.numpy.kind != "b" and arr.dtype.kind == "b":
            raise TypeError(f"expected {datatype} numbers, got {_kind(arr)}")
        converted = arr.astype(dtype.numpy, casting="unsafe")
        if dtype.numpy.kind in "iu" and not np.array_equal(converted, arr):
            raise OverflowError(f"a value is out of range for {datatype}")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"input '{shown(name)}': unable to parse 'data': {exc}") from None
    if converted.size != count:
        raise InvalidArgument(
            f"input '{shown(name)}': 'data' has {converted.size} elements but shape "
            f"{list(shape)} needs {count}"
        )
    return converted.tobytes()


def _kind(arr: np.ndarray) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}.get(
        arr.dtype.kind, "non-numbers"
    )


@dataclass
class InferPlan:
    """What the response encoder needs to know from the request: which outputs go binary."""

    binary_default: bool
    binary: dict[str, bool]
    in_shm: frozenset[str] = frozenset()  # outputs written into client shared memory

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_default)


def infer_request(
    body: memoryview, header_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, list[memoryview | bytes], InferPlan]:
    """An infer body as (request, raw inputs in input order, output encoding plan).

    `header_length` is the Inference-Header-Content-Length value (None: the whole body is
    JSON). Binary slices are views of `body`; their sizes must add up to exactly the bytes
    after the head."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length {header_length} is outside the request body of "
            f"{len(body)} bytes"
        )
    if header_length > MAX_JSON_HEAD:
        raise InvalidArgument(
            f"the JSON inference header of {header_length} bytes exceeds the maximum of "
            f"{MAX_JSON_HEAD} bytes; send large tensors as binary data ('{BINARY_DATA_SIZE}' "
            "with Inference-Header-Content-Length)"
        )
    head = parse_json(body[:header_length], "inference request header")
    if not isinstance(head, dict):
        raise InvalidArgument("inference request header: expected a JSON object")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = head.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    request.id = request_id
    params = _parameters(head.get("parameters"), "the request")
    _copy_parameters(request.parameters, params, "the request")
    binary_default = params.get(BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument(f"'{BINARY_DATA_OUTPUT}' must be a boolean")

    inputs = head.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inference request header: 'inputs' must be a list")
    raws: list[memoryview | bytes] = []
    offset = header_length
    for entry in inputs:
        offset = _input(entry, request, raws, body, offset)
    if offset != len(body):
        raise InvalidArgument(
            f"the inputs' binary_data_size add up to {offset - header_length} bytes but the "
            f"request carries {len(body) - header_length} bytes after the JSON header"
        )

    binary: dict[str, bool] = {}
    in_shm: set[str] = set()
    outputs = head.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("inference request header: 'outputs' must be a list")
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgument("each requested output must be an object with a 'name'")
        name = entry["name"]
        out = request.outputs.add(name=name)
        out_params = _parameters(entry.get("parameters"), f"output '{shown(name)}'")
        if BINARY_DATA in out_params:
            if not isinstance(out_params[BINARY_DATA], bool):
                raise InvalidArgument(f"output '{shown(name)}': '{BINARY_DATA}' must be a boolean")
            binary[name] = out_params[BINARY_DATA]
        _copy_parameters(out.parameters, out_params, f"output '{shown(name)}'")
        if "shared_memory_region" in out_params:
            in_shm.add(name)
    return request, raws, InferPlan(binary_default, binary, frozenset(in_shm))


def _input(
    entry: Any,
    request: pb.ModelInferRequest,
    raws: list[memoryview | bytes],
    body: memoryview,
    offset: int,
) -> int:
    """Add one input to `request` (and its bytes to `raws`); returns the new body offset."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidArgument("each input must be an object with a string 'name'")
    name = entry["name"]
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input '{shown(name)}': 'datatype' must be a string")
    shape = _shape(entry.get("shape"), name)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    params = _parameters(entry.get("parameters"), f"input '{shown(name)}'")
    _copy_parameters(tensor.parameters, params, f"input '{shown(name)}'")
    size = params.get(BINARY_DATA_SIZE)
    has_data = "data" in entry
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(
                f"input '{shown(name)}': '{BINARY_DATA_SIZE}' must be a non-negative integer"
            )
        if has_data:
            raise InvalidArgument(
                f"input '{shown(name)}' has both 'data' and '{BINARY_DATA_SIZE}'; give one"
            )
        if offset + size > len(body):
            raise InvalidArgument(
                f"input '{shown(name)}': '{BINARY_DATA_SIZE}' of {size} bytes runs past the "
                f"end of the request body ({len(body) - offset} bytes left)"
            )
        raws.append(body[offset : offset + size])
        return offset + size
    if has_data:
        if "shared_memory_region" in params:
            raise InvalidArgument(
                f"input '{shown(name)}' has both 'data' and 'shared_memory_region'; give one"
            )
        raws.append(json_data_to_raw(entry["data"], datatype, shape, name))
        return offset
    if "shared_memory_region" not in params:
        raise InvalidArgument(
            f"input '{shown(name)}' must have 'data', '{BINARY_DATA_SIZE}' or "
            "'shared_memory_region'"
        )
    return offset


# -- infer response -----------------------------------------------------------------------------


def _param_json(param: pb.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def _bytes_items(raw: bytes | memoryview) -> list[str]:
    """A length-prefixed BYTES buffer (which our own encoder wrote) as JSON strings."""
    mv = memoryview(raw).cast("B")
    out: list[str] = []
    pos, end = 0, len(mv)
    while pos < end:
        (n,) = struct.unpack_from("<I", mv, pos)
        out.append(bytes(mv[pos + 4 : pos + 4 + n]).decode("utf-8", "replace"))
        pos += 4 + n
    return out


def _json_data(raw: bytes | memoryview, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return _bytes_items(raw)
    dtype = BY_NAME.get(datatype)
    if dtype is None or dtype.numpy is None:
        raise InvalidArgument(
            f"output datatype '{datatype}' cannot be returned as JSON; request it with "
            f"'{BINARY_DATA}': true"
        )
    values: list[Any] = np.frombuffer(raw, dtype=dtype.numpy).tolist()
    return values


def infer_response(
    response: pb.ModelInferResponse, raws: Sequence[bytes | memoryview], plan: InferPlan
) -> tuple[bytes, list[bytes | memoryview]]:
    """(JSON head, binary output slices in order). With no slices the head is the whole body;
    otherwise the head's length goes in Inference-Header-Content-Length."""
    aligned = len(raws) == len(response.outputs)
    next_raw = 0
    outputs = []
    binaries: list[bytes | memoryview] = []
    for i, out in enumerate(response.outputs):
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        params = {k: _param_json(v) for k, v in out.parameters.items()}
        in_shm = out.name in plan.in_shm or "shared_memory_region" in out.parameters
        raw: bytes | memoryview | None = None
        if aligned:
            raw = None if in_shm else raws[i]
        elif not in_shm:
            raw = raws[next_raw]
            next_raw += 1
        if raw is not None:
            if plan.wants_binary(out.name):
                size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
                params[BINARY_DATA_SIZE] = size
                binaries.append(raw)
            else:
                entry["data"] = _json_data(raw, out.datatype)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        head["model_version"] = response.model_version
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = {k: _param_json(v) for k, v in response.parameters.items()}
    head["outputs"] = outputs
    return dumps(head), binaries


def dumps(value: Any) -> bytes:
    """Compact JSON; NaN/Infinity in float outputs are written as JavaScript's literals, as
    Python and tritonclient read them."""
    return json.dumps(value, separators=(",", ":")).encode()


# -- other messages -----------------------------------------------------------------------------

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_json(message: Message, *, defaults: bool = True) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: proto field names, every field
    (with defaults) present, and 64-bit integers as JSON numbers (protobuf's JSON mapping
    would quote them; Triton's statistics and config have them as numbers)."""
    value: dict[str, Any] = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=defaults,
    )
    _unquote(message.DESCRIPTOR, value)
    return value


def _unquote(descriptor: Any, value: dict[str, Any]) -> None:
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                vfield = field.message_type.fields_by_name["value"]
                if vfield.message_type is not None:
                    for sub in item.values():
                        _unquote(vfield.message_type, sub)
                elif vfield.type in _INT64_TYPES:
                    for k in item:
                        item[k] = int(item[k])
            elif isinstance(item, list):
                for sub in item:
                    _unquote(field.message_type, sub)
            elif isinstance(item, dict):
                _unquote(field.message_type, item)
        elif field.type in _INT64_TYPES:
            value[key] = [int(v) for v in item] if isinstance(item, list) else int(item)


def model_metadata(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


def repository_index(response: pb.RepositoryIndexResponse) -> list[dict[str, Any]]:
    out = []
    for model in response.models:
        entry = {"name": model.name}
        if model.version:
            entry["version"] = model.version
        if model.state:
            entry["state"] = model.state
        if model.reason:
            entry["reason"] = model.reason
        out.append(entry)
    return out


def index_request(body: dict[str, Any]) -> pb.RepositoryIndexRequest:
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgument("'ready' must be a boolean")
    return pb.RepositoryIndexRequest(ready=ready)


def load_request(model: str, body: dict[str, Any]) -> pb.RepositoryModelLoadRequest:
    """`parameters`: `config` (a JSON string, the model configuration to load with) and
    `file:<path>` (the file's content in base64), as Triton's load API takes them."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    for key, value in _parameters(body.get("parameters"), "the load request").items():
        param = request.parameters[key]
        if key.startswith("file:"):
            if not isinstance(value, str):
                raise InvalidArgument(f"'{shown(key)}' must be base64 text")
            try:
                param.bytes_param = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"'{shown(key)}' is not valid base64") from None
        else:
            _repo_parameter(param, key, value, "the load request")
    return request


def unload_request(model: str, body: dict[str, Any]) -> pb.RepositoryModelUnloadRequest:
    request = pb.RepositoryModelUnloadRequest(model_name=model)
    for key, value in _parameters(body.get("parameters"), "the unload request").items():
        _repo_parameter(request.parameters[key], key, value, "the unload request")
    return request


def _repo_parameter(param: Any, key: str, value: Any, where: str) -> None:
    """A ModelRepositoryParameter from JSON: bool, int64 or string (files are base64)."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value <= INT64_MAX:
        param.int64_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidArgument(
            f"parameter '{shown(key)}' of {where} has invalid type. It should be either "
            "'int', 'bool', or 'string'."
        )


def shm_register(body: dict[str, Any]) -> tuple[str, int, int]:
    """(key, offset, byte_size) of a system shared memory registration."""
    key = body.get("key")
    offset = body.get("offset", 0)
    size = body.get("byte_size")
    if not isinstance(key, str):
        raise InvalidArgument("'key' must be a string")
    for name, value in (("offset", offset), ("byte_size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
            raise InvalidArgument(f"'{name}' must be a non-negative integer")
    return key, offset, size  # type: ignore[return-value]


def trace_update(body: dict[str, Any]) -> dict[str, list[str] | None]:
    """A trace settings body: each value a string, a list of strings, or null (clear)."""
    update: dict[str, list[str] | None] = {}
    for key, value in body.items():
        if value is None:
            update[key] = None
        elif isinstance(value, str):
            update[key] = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            update[key] = list(value)
        else:
            raise InvalidArgument(
                f"trace setting '{shown(key)}' must be a string, a list of strings or null"
            )
    return update


def trace_json(settings: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Triton's HTTP trace settings: trace_level a list, every other setting one string."""
    return {
        key: list(values) if key == "trace_level" or len(values) != 1 else values[0]
        for key, values in settings.items()
    }


def log_update(body: dict[str, Any]) -> dict[str, bool | int | str]:
    update: dict[str, bool | int | str] = {}
    for key, value in body.items():
        if not isinstance(value, bool | int | str):
            raise InvalidArgument(f"log setting '{shown(key)}' must be a boolean, number or string")
        update[key] = value
    return update
