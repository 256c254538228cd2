#!/usr/bin/env bash
# Runs `hetero ARGS…` inside the image of an OCI archive without a container
# engine: the archive's layers are unpacked into a fresh folder, and hetero runs
# chrooted there, in mount and PID namespaces of its own (a /proc, /dev and /tmp
# of its own). Needs root (or CAP_SYS_ADMIN and CAP_SYS_CHROOT).
#
#   deploy/container/run.sh target/container/hetero-image.tar local /opt/hetero/examples/fashion-mnist-subset.toml
set -euo pipefail
archive=${1:?usage: run.sh IMAGE.tar HETERO-ARGS…}
shift
root=$(mktemp -d /tmp/hetero-image.XXXXXX)
# The mounts live in the namespace and end with it; the folder is removed here.
trap 'rm -rf --one-file-system "$root"' EXIT
python3 - "$archive" "$root" <<'PY'
import json, sys, tarfile
archive, root = sys.argv[1], sys.argv[2]
with tarfile.open(archive) as oci:
    index = json.load(oci.extractfile("index.json"))
    manifest = json.load(oci.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=oci.extractfile("blobs/sha256/" + layer["digest"].split(":")[1]), mode="r:gz") as t:
            t.extractall(root + "/rootfs", filter="tar")
    config = json.load(oci.extractfile("blobs/sha256/" + manifest["config"]["digest"].split(":")[1]))["config"]
with open(root + "/env", "w") as f:
    f.write("\n".join(config["Env"]) + "\n")
with open(root + "/workdir", "w") as f:
    f.write(config["WorkingDir"])
PY
rootfs=$root/rootfs
workdir=$(cat "$root/workdir")
mapfile -t env <"$root/env"
# The image's own environment only, as an engine gives it, then chroot and
# WORKDIR (util-linux's unshare --root --wd).
unshare --mount --pid --fork --propagation private sh -c '
  root=$1; workdir=$2; shift 2
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs tmpfs "$root/tmp"
  exec "$@"
' run "$rootfs" "$workdir" env -i "${env[@]}" unshare --root="$rootfs" --wd="$workdir" /usr/local/bin/hetero "$@"
