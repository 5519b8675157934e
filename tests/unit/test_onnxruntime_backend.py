"""Provider selection and failure modes of the ORT backend, without a GPU.

CI has no GPU, so the CUDA path is exercised through its decisions: which devices an
instance_group asks for, which providers a session is created with, and what happens when ORT
silently falls back to CPU (onnxruntime-gpu lists CUDA even on GPU-less machines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from tributary.backends import onnxruntime as backend
from tributary.errors import ModelLoadError
from tributary_client._proto import model_config_pb2 as mc


def _config(text: str) -> mc.ModelConfig:
    return text_format.Parse('name: "m"\n' + text, mc.ModelConfig())


def test_cpu_group_count_and_names():
    cfg = _config('instance_group [{ name: "g" kind: KIND_CPU count: 3 }]')
    plan = backend.plan_devices(cfg, gpus=0)
    assert [n for n, _ in plan] == ["g_0", "g_1", "g_2"]
    assert {d.kind for _, d in plan} == {"CPU"}


def test_gpu_group_per_listed_gpu():
    cfg = _config('instance_group [{ name: "g" kind: KIND_GPU count: 2 gpus: [0, 2] }]')
    plan = backend.plan_devices(cfg, gpus=4)
    assert [(n, d.kind, d.id) for n, d in plan] == [
        ("g_0_gpu0", "GPU", 0),
        ("g_1_gpu0", "GPU", 0),
        ("g_0_gpu2", "GPU", 2),
        ("g_1_gpu2", "GPU", 2),
    ]


def test_gpu_group_without_gpus_uses_all():
    cfg = _config('instance_group [{ name: "g" kind: KIND_GPU count: 1 }]')
    assert [d.id for _, d in backend.plan_devices(cfg, gpus=2)] == [0, 1]


def test_kind_auto_follows_the_machine(caplog):
    cfg = _config('instance_group [{ name: "g" kind: KIND_AUTO count: 1 }]')
    assert backend.plan_devices(cfg, gpus=1)[0][1].kind == "GPU"
    with caplog.at_level("INFO"):
        assert backend.plan_devices(cfg, gpus=0)[0][1].kind == "CPU"
    assert "no GPU found" in caplog.text


def test_kind_gpu_without_gpu_is_a_load_error():
    cfg = _config('instance_group [{ name: "g" kind: KIND_GPU }]')
    with pytest.raises(ModelLoadError, match="KIND_GPU, but no GPU is available"):
        backend.plan_devices(cfg, gpus=0)


def test_unknown_gpu_id_is_a_load_error():
    cfg = _config('instance_group [{ name: "g" kind: KIND_GPU gpus: [3] }]')
    with pytest.raises(ModelLoadError, match="names GPU 3, but this machine has 2"):
        backend.plan_devices(cfg, gpus=2)


def test_cuda_provider_options(caplog):
    cfg = _config("optimization { cuda { graphs: true } }")
    with caplog.at_level("WARNING"):
        providers = backend.providers_for(cfg, backend.Device("GPU", 1))
    assert providers == [("CUDAExecutionProvider", {"device_id": "1"})]
    assert "cuda.graphs is not supported yet" in caplog.text
    assert backend.providers_for(cfg, backend.Device("CPU")) == [("CPUExecutionProvider", {})]


def test_tensorrt_accelerator_maps_triton_parameters():
    cfg = _config(
        "optimization { execution_accelerators { gpu_execution_accelerator [{"
        ' name: "tensorrt" parameters { key: "precision_mode" value: "FP16" }'
        ' parameters { key: "max_workspace_size_bytes" value: "1073741824" } }] } }'
    )
    providers = backend.providers_for(cfg, backend.Device("GPU", 0))
    assert providers[0] == (
        "TensorrtExecutionProvider",
        {"device_id": "0", "trt_fp16_enable": "1", "trt_max_workspace_size": "1073741824"},
    )
    assert providers[1][0] == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    "accelerator, message",
    [
        ('name: "tensorrt" parameters { key: "precision_mode" value: "FP8" }', "precision_mode"),
        ('name: "tensorrt" parameters { key: "bogus" value: "1" }', "unknown TensorRT"),
        ('name: "openvino"', "not supported"),
    ],
)
def test_bad_gpu_accelerators_fail_clearly(accelerator, message):
    cfg = _config(
        "optimization { execution_accelerators { gpu_execution_accelerator [{ "
        + accelerator
        + " }] } }"
    )
    with pytest.raises(ModelLoadError, match=message):
        backend.providers_for(cfg, backend.Device("GPU", 0))


def test_silent_cpu_fallback_is_a_load_error():
    with pytest.raises(ModelLoadError, match="could not enable CUDAExecutionProvider"):
        backend.check_providers(
            "m",
            "g_0",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CPUExecutionProvider"],
        )
    backend.check_providers(
        "m",
        "g_0",
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )


class _FakeSession:
    """Stands in for InferenceSession: records how it was created, reports chosen providers."""

    def __init__(self, got: list[str]) -> None:
        self.got = got
        self.created_with: dict = {}

    def __call__(self, path, sess_options=None, providers=None):
        self.created_with = {"path": path, "providers": providers}
        return self

    def get_providers(self) -> list[str]:
        return self.got


def test_instance_refuses_gpu_session_that_fell_back(tmp_path: Path):
    cfg = _config("")
    fake = _FakeSession(["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match="refusing to run a GPU instance on CPU"):
        backend.OrtInstance(
            "g_0",
            tmp_path / "model.onnx",
            backend.Device("GPU", 0),
            cfg,
            options=None,
            session_factory=fake,
        )
    assert fake.created_with["providers"][0] == ("CUDAExecutionProvider", {"device_id": "0"})
    assert fake.created_with["providers"][-1] == ("CPUExecutionProvider", {})


def test_instance_accepts_gpu_session_with_cuda(tmp_path: Path):
    fake = _FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])
    inst = backend.OrtInstance(
        "g_0",
        tmp_path / "model.onnx",
        backend.Device("GPU", 0),
        _config(""),
        options=None,
        session_factory=fake,
    )
    assert inst.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_request_on_this_gpu_less_machine_fails_to_load(tmp_path: Path):
    """The real ORT here lists CUDA but cannot use it: the load must fail, not run on CPU."""
    import build_models as bm

    bm.build_simple(tmp_path)
    model = tmp_path / "simple" / "1" / "model.onnx"
    cfg = _config("max_batch_size: 8")
    opts = backend.session_options(cfg, cpu_instances=1)
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        backend.OrtInstance("g_0", model, backend.Device("GPU", 0), cfg, opts)


def test_session_options_defaults_do_not_oversubscribe():
    cfg = _config("")
    # One CPU is left to the gRPC front end, the rest split across the CPU instances.
    assert backend.session_options(cfg, cpu_instances=2, cores=2).intra_op_num_threads == 1
    assert backend.session_options(cfg, cpu_instances=1, cores=2).intra_op_num_threads == 1
    assert backend.session_options(cfg, cpu_instances=1, cores=8).intra_op_num_threads == 7
    assert backend.session_options(cfg, cpu_instances=2, cores=9).intra_op_num_threads == 4
    assert backend.session_options(cfg, cpu_instances=1, cores=1).intra_op_num_threads == 1
    so = backend.session_options(cfg, cpu_instances=4, cores=2)
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spin = _config(
        'parameters { key: "session.intra_op.allow_spinning" value: { string_value: "1" } }'
    )
    opts = backend.session_options(spin, cpu_instances=1, cores=2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    tuned = _config('parameters { key: "intra_op_thread_count" value: { string_value: "3" } }')
    assert backend.session_options(tuned, cpu_instances=2, cores=2).intra_op_num_threads == 3


def test_cpu_instance_runs(tmp_path: Path):
    import build_models as bm

    bm.build_simple(tmp_path)
    cfg = _config("max_batch_size: 8")
    inst = backend.OrtInstance(
        "g_0",
        tmp_path / "simple" / "1" / "model.onnx",
        backend.Device("CPU"),
        cfg,
        backend.session_options(cfg, cpu_instances=1),
    )
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    out = inst.run({"INPUT0": a, "INPUT1": a}, ["OUTPUT1", "OUTPUT0"])
    assert list(out) == ["OUTPUT1", "OUTPUT0"]
    np.testing.assert_array_equal(out["OUTPUT0"], a * 2)
    np.testing.assert_array_equal(out["OUTPUT1"], np.zeros_like(a))


def test_gpu_count_from_device_nodes(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # NVML unavailable
    monkeypatch.setattr(
        backend.glob,
        "glob",
        lambda pattern: ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"],
    )
    assert backend.gpu_count() == 2
    monkeypatch.setattr(backend.glob, "glob", lambda pattern: [])
    assert backend.gpu_count() == 0


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def test_cpu_count_follows_a_cgroup_quota(tmp_path) -> None:
    """A pod limited to 1.5 CPUs on a bigger node gets 2 threads' worth, not the node's count."""
    from tributary.backends.onnxruntime import _cgroup_quota, cpu_count

    assert _cgroup_quota(_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})) == 2
    assert _cgroup_quota(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) is None
    v1 = {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert _cgroup_quota(_cgroup(tmp_path / "v1", v1)) == 3
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert _cgroup_quota(_cgroup(tmp_path / "v1none", unlimited)) is None
    assert _cgroup_quota(_cgroup(tmp_path / "junk", {"cpu.max": "lots\n"})) is None
    assert _cgroup_quota(str(tmp_path / "absent")) is None
    affinity = len(__import__("os").sched_getaffinity(0))
    one = _cgroup(tmp_path / "one", {"cpu.max": "50000 100000\n"})
    assert cpu_count(one) == 1
    assert cpu_count(str(tmp_path / "absent")) == affinity
