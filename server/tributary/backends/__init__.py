"""Execution backends (ONNX Runtime), kept apart so config and repository stay engine-free."""
