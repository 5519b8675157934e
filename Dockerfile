# Tributary on the CUDA runtime: onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9.
# The same image runs on CPU-only nodes (KIND_AUTO instances fall back to CPU, logged).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tributary
COPY pyproject.toml README.md constraints.txt ./
COPY server/ server/
COPY clients/ clients/
# The exact versions CI tested (constraints.txt, written by `make lock`), plus NVML for GPU
# metrics.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[gpu]"
COPY model_repository/ /models/

RUN useradd --uid 1000 --create-home tributary
USER 1000
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["tributary-health", "localhost:8001"]
ENTRYPOINT ["tributary"]
CMD ["--model-repository=/models"]
