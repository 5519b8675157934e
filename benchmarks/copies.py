"""Copies of a large payload on the server path: how many times each request's bytes are copied.

Starts Tributary on `big` (FP32 [3,224,224] in and out, 602,112 bytes each way; the model is
built as `benchmarks/run.py` builds it) with a small preloaded library that wraps `memcpy`,
`memmove`, `mempcpy` and their `_chk` variants. Every call that copies at least half a payload
is logged with the shared object that called it. After a warm-up the script sends --requests
ModelInfer requests one at a time and reports payload-sized copies per request, by caller.

What it cannot see: copies made by loops of a library's own (no call to memcpy) and copies
inside a library that calls its own internal memcpy without going through the dynamic linker.
ONNX Runtime computing the output (OUTPUT0 = INPUT0 + 0) writes it, which is not a copy.

Needs a C compiler (`cc`) to build the wrapper.

    python benchmarks/copies.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BIG_SHAPE, OUT, build_repo  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

WRAPPER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
static void *(*real_memcpy)(void *, const void *, size_t);
static void *(*real_memmove)(void *, const void *, size_t);
static __thread int inside;
static size_t threshold;
static const char *log_path;
static void note(size_t n) {
    if (!log_path) { threshold = atol(getenv("COPIES_MIN")); log_path = getenv("COPIES_LOG"); }
    if (n < threshold || inside || !log_path) return;
    inside = 1;
    /* the first frame outside this library is the caller */
    void *bt[6]; Dl_info self, info; const char *lib = "?";
    int k = backtrace(bt, 6);
    dladdr((void *)note, &self);
    for (int i = 1; i < k; i++)
        if (dladdr(bt[i], &info) && info.dli_fname && info.dli_fbase != self.dli_fbase) {
            lib = info.dli_fname;
            break;
        }
    FILE *f = fopen(log_path, "a");
    if (f) { fprintf(f, "%zu %s\n", n, lib); fclose(f); }
    inside = 0;
}
static void *cp(void *d, const void *s, size_t n) {
    if (!real_memcpy) real_memcpy = dlsym(RTLD_NEXT, "memcpy");
    note(n); return real_memcpy(d, s, n);
}
static void *mv(void *d, const void *s, size_t n) {
    if (!real_memmove) real_memmove = dlsym(RTLD_NEXT, "memmove");
    note(n); return real_memmove(d, s, n);
}
void *memcpy(void *d, const void *s, size_t n) { return cp(d, s, n); }
void *memmove(void *d, const void *s, size_t n) { return mv(d, s, n); }
void *mempcpy(void *d, const void *s, size_t n) { return (char *)cp(d, s, n) + n; }
void *__memcpy_chk(void *d, const void *s, size_t n, size_t dn) { return cp(d, s, n); }
void *__memmove_chk(void *d, const void *s, size_t n, size_t dn) { return mv(d, s, n); }
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    opts = parser.parse_args()
    payload = int(np.prod(BIG_SHAPE)) * 4
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "wrap.c").write_text(WRAPPER)
        lib = work / "wrap.so"
        subprocess.run(
            ["cc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(work / "wrap.c"), "-ldl"],
            check=True,
        )
        OUT.mkdir(exist_ok=True)
        repo = OUT / "repo"
        if not (repo / "big").exists():
            build_repo(repo)
        log = work / "copies.log"
        port_file = work / "port.json"
        env = dict(
            os.environ,
            LD_PRELOAD=str(lib),
            COPIES_LOG=str(log),
            COPIES_MIN=str(payload // 2),
        )
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tributary.cli",
                "--model-repository",
                str(repo),
                "--model-control-mode=explicit",
                "--load-model=big",
                "--grpc-port",
                "0",
                "--grpc-address",
                "127.0.0.1",
                "--allow-http=false",
                "--allow-metrics=false",
                "--port-file",
                str(port_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.1)
            port = json.loads(port_file.read_text())["grpc_port"]
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 4 * payload)]
            )
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="big")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=BIG_SHAPE)
            request.raw_input_contents.append(np.ones(BIG_SHAPE, np.float32).tobytes())
            for _ in range(5):
                stub.ModelInfer(request)
            time.sleep(0.5)
            before = len(log.read_text().splitlines()) if log.exists() else 0
            for _ in range(opts.requests):
                stub.ModelInfer(request)
            time.sleep(0.5)
            lines = log.read_text().splitlines()[before:] if log.exists() else []
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    n = opts.requests
    print(f"payload {payload:,} bytes; {len(lines) / n:.2f} payload-sized copies per request:")
    for line, count in Counter(lines).most_common():
        size, caller = line.split(" ", 1)
        print(f"  {count / n:.2f} per request: {int(size):,} bytes, called from {caller}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
