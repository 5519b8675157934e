"""Tributary: a KServe v2 / Triton-compatible gRPC inference server for ONNX models."""

__version__ = "0.1.0"
