#!/bin/sh
# Regenerate the committed Python gRPC stubs from protos/ into <project>/cvmfs_api/.
# Run from anywhere, inside the project's venv (needs grpcio-tools at the pinned version).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
cd "$here"
protos=$(find cvmfs_api -name '*.proto' | sort)
"${PYTHON:-$top/.venv/bin/python}" -m grpc_tools.protoc -I . --python_out="$top" --grpc_python_out="$top" --pyi_out="$top" $protos
# Make every generated directory a regular package so setuptools finds it.
find "$top/cvmfs_api" -type d -exec sh -c 'for d; do [ -f "$d/__init__.py" ] || : > "$d/__init__.py"; done' sh {} +
