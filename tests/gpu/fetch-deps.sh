#!/usr/bin/env bash
# Gathers, on the dev machine (Debian 12, with the Debian archive reachable), what a GPU host
# with no network and none of the daemon's libraries needs for the full build
# (tests/gpu/run.sh --full), into two git-ignored folders that travel with `carry`:
#   .gpu-deps/    the Debian 12 amd64 .debs: the -dev packages of .ci/install-deps (less the
#                 toolchain, Python, clang and prometheus) and every library they pull in,
#                 resolved with `apt-cache depends --recurse`, less the base packages that any
#                 Ubuntu 24.04 host with g++ already has (libc6, libstdc++6, ...). run.sh --full
#                 unpacks them with `dpkg -x` into a prefix, never into /. MANIFEST lists them.
#   .gpu-shared/  the test data the ctest suite reads (models/ and datasets/ of ../shared),
#                 passed there as -DNIBBLE_SHARED_DIR.
#   tests/gpu/fetch-deps.sh          (NIBBLE_SHARED_DIR=... to copy the data from elsewhere)
#   NIBBLE_FETCH_PROMETHEUS=1 also fetches prometheus (its .deb alone, 19 MB: static binaries)
#   for the test integration.server_prometheus, which fails without it.
# Idempotent: .debs already there are kept; re-running after a package update replaces them.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEBS=.gpu-deps
DATA=.gpu-shared
SHARED="${NIBBLE_SHARED_DIR:-$(cd .. && pwd)/shared}"

# The roots: .ci/install-deps' libraries and code generators. Left out: build-essential,
# cmake, ninja-build, git, python3*, clang (the host has its own toolchain and Python with
# numpy/grpcio/protobuf), prometheus (optional for the tests; ~30 MB). pkgconf: used only where
# the host has no pkg-config.
roots=(
  libabsl-dev libsentencepiece-dev nlohmann-json3-dev libcli11-dev
  libcurl4-openssl-dev libssl-dev zlib1g-dev
  libgtest-dev libgmock-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libyaml-cpp-dev
  pkgconf
)
# Never fetched: glibc and the compiler's runtime (the host's are newer, and a second copy
# would break it), their -dev parts (g++ brings them), and googletest (GoogleTest's sources;
# libgtest-dev holds the built libraries). civetweb stays: civetweb's CMake targets name its
# binary, and find_package(prometheus-cpp) fails without the file.
skip='^(libc6|libc6-dev|libc-dev-bin|linux-libc-dev|libcrypt1|libcrypt-dev|libnsl2|libnsl-dev|libtirpc3|libtirpc-dev|libtirpc-common|rpcsvc-proto|gcc-12-base|libgcc-s1|libstdc\+\+6|googletest|debconf|dpkg|perl-base)$'

apt_opts=()
if [[ "$(dpkg --print-architecture)" != amd64 ]]; then
  # A non-amd64 dev machine: an amd64 package list of its own, outside the system's.
  apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
  mkdir -p /tmp/amd64-lists/partial
  apt-get "${apt_opts[@]}" update -qq
fi

mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances "${roots[@]}" \
  | grep -v '^[ <]' | sort -u | grep -Ev "$skip")
[[ "${NIBBLE_FETCH_PROMETHEUS:-0}" == 1 ]] && pkgs+=(prometheus)
echo "fetch-deps: ${#pkgs[@]} packages"

mkdir -p "$DEBS"
cd "$DEBS"
# Versions the archive offers now; a .deb of another version (an older run) goes.
want=()
for p in "${pkgs[@]}"; do
  v=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$p" | awk '/^Version:/{print $2; exit}')
  want+=("${p}_${v//:/%3a}_")
done
for f in *.deb; do
  [[ -e "$f" ]] || continue
  keep=0
  for w in "${want[@]}"; do [[ "$f" == "$w"* ]] && keep=1 && break; done
  [[ $keep == 1 ]] || { echo "fetch-deps: removing stale $f"; rm -f "$f"; }
done
missing=()
for i in "${!pkgs[@]}"; do
  compgen -G "${want[$i]}*.deb" > /dev/null || missing+=("${pkgs[$i]}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  apt-get "${apt_opts[@]}" download "${missing[@]/%/:amd64}"
fi
ls -l *.deb | awk '{printf "%9d %s\n", $5, $9}' > MANIFEST
cd ..
echo "fetch-deps: $(ls "$DEBS"/*.deb | wc -l) .debs, $(du -sh "$DEBS" | cut -f1) in $DEBS/"

# Test data: the suite reads models/{stories260K,configs,llama2-tokenizer} and
# datasets/{tinystories,ptb,wikitext-2}; all of models/ and datasets/ is about 5 MB.
if [[ ! -f "$SHARED/models/stories260K/stories260K.bin" ]]; then
  echo "fetch-deps: no test data at $SHARED (set NIBBLE_SHARED_DIR)" >&2
  exit 1
fi
rm -rf "$DATA"
mkdir -p "$DATA"
cp -r "$SHARED/models" "$SHARED/datasets" "$DATA/"
chmod -R u+w "$DATA"
echo "fetch-deps: test data $(du -sh "$DATA" | cut -f1) in $DATA/"
echo "fetch-deps: carry [\"$DEBS\", \"$DATA\"] and run tests/gpu/run.sh --full"
