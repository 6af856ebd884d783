#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from carajax/server/carajax.proto (needs the `dev` extra:
# grpcio-tools). Run from anywhere: scripts/gen_proto.sh [PYTHON]
#
# The stubs check the runtime at import: carajax_pb2 calls ValidateProtobufRuntimeVersion with the
# protoc version bundled in grpcio-tools, and carajax_pb2_grpc refuses a grpcio older than
# grpcio-tools. After regenerating, keep pyproject's protobuf and grpcio lower bounds at those
# versions (printed below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-${PYTHON:-.venv/bin/python}}"
OUT=carajax/server
# -I at the proto's own folder: the generated module is carajax_pb2 and the descriptor's file name
# is carajax.proto, which reflection clients see.
"$PYTHON" -m grpc_tools.protoc -I "$OUT" --python_out="$OUT" --pyi_out="$OUT" \
    --grpc_python_out="$OUT" "$OUT/carajax.proto"
# protoc writes `import carajax_pb2 as ...`, which only works with the folder on sys.path; the
# package needs a relative import.
sed -i -E 's/^import carajax_pb2 as /from . import carajax_pb2 as /' "$OUT/carajax_pb2_grpc.py"
PB=$(sed -n '/ValidateProtobufRuntimeVersion(/,/)/p' "$OUT/carajax_pb2.py" | grep -oE '^ *[0-9]+,' | tr -d ' ,' | paste -sd.)
GRPC=$(sed -nE "s/^GRPC_GENERATED_VERSION = '(.*)'/\1/p" "$OUT/carajax_pb2_grpc.py")
echo "generated $OUT/carajax_pb2{.py,.pyi,_grpc.py}: needs protobuf>=$PB and grpcio>=$GRPC at runtime"
