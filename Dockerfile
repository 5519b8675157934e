# Tributary server image (docs/deployment.md). One Dockerfile, two variants:
#
#   GPU (default):  docker build -t tributary:0.1.0 .
#   CPU only:       docker build --build-arg BASE=ubuntu:24.04 -t tributary:0.1.0-cpu .
#
# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9, which the CUDA base image supplies. The
# same wheel runs on CPU-only machines (KIND_AUTO instances fall back to CPU, logged), so the
# CPU variant differs only in its base: plain Ubuntu 24.04, without CUDA and cuDNN.
# Both bases are Ubuntu 24.04 (Python 3.12 at /usr/bin/python3), which the venv relies on.
ARG BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---- build: the virtual environment. pip, the sources and python3-venv stay in this stage.
FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt pip
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# Exactly the versions CI tested (constraints.txt, written by `make lock`), the build backend
# too, plus NVML for the GPU gauges. The server requires the SDK (clients/, tributary-client),
# which is on no index: both go in one command so pip takes it from ./clients.
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt \
      --build-constraint constraints.txt ./clients ".[gpu]" \
 && /opt/venv/bin/tributary --version \
 && /opt/venv/bin/tributary-health --help >/dev/null

# ---- runtime: the base image, python3 and the venv; nothing else from the build.
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 images ship user 'ubuntu' as uid 1000; KServe and deploy/ run the container as
# uid 1000, so that uid becomes 'tributary' (a plain `useradd --uid 1000` fails: not unique).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid 1000 tributary \
 && useradd --uid 1000 --gid 1000 --home-dir /home/tributary --create-home \
      --shell /usr/sbin/nologin tributary
COPY --from=build /opt/venv /opt/venv
# Flags go to tributary; a leading `tritonserver` (Triton-image command lines, as in KServe's
# Triton runtime) or `tributary` word is dropped; any other command runs as given.
COPY docker/entrypoint.sh /usr/local/bin/tributary-entrypoint
# Example models, so `docker run` serves something; mount your repository over /models
# (docker run -v "$PWD/models:/models:ro" ...) or pass --model-repository=<path>.
COPY model_repository/ /models/

# ORT_DISABLE_TELEMETRY: otherwise onnxruntime 1.31 keeps a telemetry id in
# ~/.cache/Microsoft/DeveloperTools, the only file the server would write (a read-only root
# filesystem just gets a warning). With it, the server writes nothing unless given --port-file
# or --log-file.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    TRIBUTARY_HEALTH_TARGET=localhost:8001 \
    TRIBUTARY_HEALTH_ARGS=
LABEL org.opencontainers.image.title="tributary" \
      org.opencontainers.image.description="KServe v2 / Triton-compatible gRPC and HTTP/REST inference server for ONNX models" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/tributary
EXPOSE 8000 8001 8002
# grpc.health.v1 Check (= server readiness). Shell form so it follows the run-time settings:
# TRIBUTARY_HEALTH_TARGET when --grpc-port changes, TRIBUTARY_HEALTH_ARGS for TLS
# (e.g. "--tls --ca /certs/ca.pem"); both are documented in docs/deployment.md.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD tributary-health "$TRIBUTARY_HEALTH_TARGET" $TRIBUTARY_HEALTH_ARGS || exit 1
ENTRYPOINT ["tributary-entrypoint"]
CMD ["--model-repository=/models"]
