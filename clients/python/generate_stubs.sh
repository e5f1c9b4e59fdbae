#!/bin/sh
# Writes the Python gRPC stubs nibble_client needs, generated from the repository's .proto files
# with Debian's protoc and grpc_python_plugin (apt: protobuf-compiler, protobuf-compiler-grpc):
#
#   clients/python/generate_stubs.sh [OUT_DIR]
#
# OUT_DIR defaults to clients/python/nibble_client/_generated (git-ignored), where the package
# finds them; elsewhere, point NIBBLE_CLIENT_STUBS at OUT_DIR. The result:
#   OUT_DIR/nibble/v1/{inference,models,artifacts,quantization}_pb2{,_grpc}.py   nibble.v1
#   OUT_DIR/grpc/health/v1/health_pb2{,_grpc}.py           grpc.health.v1 (health checks)
# Generated code is never committed: it must match the protoc and protobuf runtime installed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
proto_root=$here/../../proto
out=${1:-$here/nibble_client/_generated}
protoc=${PROTOC:-protoc}
plugin=${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || true)}
if ! command -v "$protoc" >/dev/null 2>&1 || [ -z "$plugin" ]; then
  echo "generate_stubs.sh: protoc and grpc_python_plugin are needed" \
       "(apt-get install protobuf-compiler protobuf-compiler-grpc)" >&2
  exit 1
fi
mkdir -p "$out"
"$protoc" -I "$proto_root/third_party" -I "$proto_root" \
  --python_out="$out" --grpc_out="$out" --plugin=protoc-gen-grpc="$plugin" \
  "$proto_root/nibble/v1/inference.proto" "$proto_root/nibble/v1/models.proto" \
  "$proto_root/nibble/v1/quantization.proto" \
  "$proto_root/nibble/v1/artifacts.proto" \
  "$proto_root/third_party/grpc/health/v1/health.proto"
echo "stubs written to $out"
