#!/bin/sh
# The image's entrypoint (docs/deployment.md).
#   docker run IMAGE --grpc-port=9000 ...          flags go to tributary
#   docker run IMAGE tritonserver --model-store=.. a command line written for Triton's image
#                                                  (KServe's kserve-tritonserver runtime starts
#                                                  its args with `tritonserver`) starts
#                                                  tributary with the same flags
#   docker run IMAGE tributary ...                 the same, spelled out
#   docker run IMAGE bash                          any other command runs as given
set -e
case "${1-}" in
  tritonserver | tributary)
    shift
    exec tributary "$@"
    ;;
  -* | "")
    exec tributary "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
