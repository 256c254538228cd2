#!/usr/bin/env bash
# Builds the hetero container image without pulling anything: the context
# (target/container/rootfs) holds the binary, the shared libraries `ldd` says it
# links, /etc basics, the Fashion-MNIST subset and the example specs; the image
# is written as an OCI archive (target/container/hetero-image.tar) by
# oci_archive.py, following deploy/Containerfile.
#
#   deploy/container/build.sh [--binary PATH] [--models smollm2,minilm] [--out DIR] [--context-only]
#
#   --binary        the hetero binary (default: target/release/hetero, built if missing)
#   --models        models from ~/.cache/hetero/models to carry (`hetero models fetch` first)
#   --out           where the context and the archive go (default: target/container)
#   --context-only  stop after the context, for `podman build -f deploy/Containerfile DIR`
#
# Load the archive with `podman load -i`, `docker load -i`, `skopeo copy
# oci-archive:FILE …`, or `ctr -n k8s.io images import` on a Kubernetes node.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
binary=$repo/target/release/hetero
out=$repo/target/container
models=
context_only=0
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --context-only) context_only=1; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$binary" ]; then
  echo "building $binary (cargo build --release -p hetero-cli)…"
  (cd "$repo" && cargo build --release -p hetero-cli)
fi

rootfs=$out/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{usr/local/bin,etc,root,proc,sys,dev,run,opt/hetero/examples,opt/hetero/data}
install -d -m 1777 "$rootfs/tmp"
# The binary without its debug sections: the image needs none.
objcopy --strip-debug "$binary" "$rootfs/usr/local/bin/hetero"
# Every shared library it links, at the path the loader looks for it. A static
# binary links none; a library the loader cannot find stops the build.
links=$(ldd "$binary" 2>&1 || true)
if grep -q "not found" <<<"$links"; then
  echo "the binary links libraries this machine does not have:" >&2
  grep "not found" <<<"$links" >&2
  exit 1
fi
awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+/ { print $1 }' <<<"$links" | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
printf 'root:x:0:0:root:/root:/usr/local/bin/hetero\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$rootfs/etc/hosts"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
cp -r "$repo/data/fashion-mnist-subset" "$rootfs/opt/hetero/data/"
cp "$repo"/examples/*.toml "$rootfs/opt/hetero/examples/"
for m in ${models//,/ }; do
  src=$HOME/.cache/hetero/models/$m
  [ -d "$src" ] || { echo "model $m is not in $src: run \`hetero models fetch $m\` first" >&2; exit 1; }
  mkdir -p "$rootfs/root/.cache/hetero/models"
  cp -r "$src" "$rootfs/root/.cache/hetero/models/"
done
echo "context: $out (rootfs $(du -sh "$rootfs" | cut -f1))"
((context_only)) && exit 0
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
python3 "$repo/deploy/container/oci_archive.py" "$repo/deploy/Containerfile" "$rootfs" "$out/hetero-image.tar" hetero:latest "$arch"
