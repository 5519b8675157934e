"""Peer: Triton Inference Server through PyTriton, running each model with ONNX Runtime.

PyTriton (`nvidia-pytriton`) bundles a tritonserver binary: Triton's C++ gRPC front end and
dynamic batcher, with a Python inference function behind it. Each model's function is bound with
`@batch` and a DynamicBatcher whose window is the model's max_queue_delay_microseconds (the same
window Tributary uses); models without batching get a plain per-request function.

Usage (in the PyTriton venv): python pytriton_server.py SPEC.json
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NUMPY_NAMES, load_spec, session  # noqa: E402


def infer_function(model: dict[str, Any]) -> Any:
    sess = session(model["onnx"])
    names = [o["name"] for o in model["outputs"]]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, inputs), strict=True))

    if model["max_batch_size"] > 0:

        @batch
        def batched(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            return run(inputs)

        return batched

    def per_request(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [run({k: np.asarray(v) for k, v in r.items()}) for r in requests]

    return per_request


def tensors(specs: list[dict[str, Any]]) -> list[Tensor]:
    return [
        Tensor(name=t["name"], dtype=np.dtype(NUMPY_NAMES[t["datatype"]]), shape=tuple(t["dims"]))
        for t in specs
    ]


def use_own_libpython() -> None:
    """Make Triton's Python stub load this interpreter's libpython, not the system's.

    The stub links `libpython3.X.so.1.0` by name. Where the venv's Python is not the system one
    (pyenv here: 3.11.7 over Debian's 3.11.2), the loader finds the system library, which then
    runs this interpreter's standard library and fails (`'_thread.RLock' object has no attribute
    '_recursion_count'` in multiprocessing). Putting our LIBDIR first fixes the pairing.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / sysconfig.get_config_var("INSTSONAME")).exists():
        rest = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = libdir + (f":{rest}" if rest else "")


def main() -> int:
    use_own_libpython()
    spec = load_spec()
    config = TritonConfig(
        grpc_port=spec["grpc_port"],
        http_port=spec["http_port"],
        metrics_port=spec["metrics_port"],
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
    )
    # PyTriton guards statistics behind an access token by default; perf_analyzer reads them
    # around every pass (and fails without them), as does run.py for the batch sizes. Plain
    # tritonserver serves them openly; the other default-protected endpoints stay protected.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=config, security_config=security) as triton:
        for model in spec["models"]:
            batching = model["max_batch_size"] > 0
            triton.bind(
                model_name=model["name"],
                infer_func=infer_function(model),
                inputs=tensors(model["inputs"]),
                outputs=tensors(model["outputs"]),
                config=ModelConfig(
                    batching=batching,
                    max_batch_size=max(model["max_batch_size"], 1),
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=model["max_queue_delay_us"]
                    ),
                ),
                strict=False,
            )
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
