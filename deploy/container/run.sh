#!/usr/bin/env bash
# Runs `hetero ARGS…` inside the image of an OCI archive without a container
# engine: the archive's layers are unpacked into a fresh folder, and hetero runs
# chrooted there, in mount and PID namespaces of its own, with a /proc and /tmp
# of its own and a /dev that holds only null, zero, random, urandom and tty.
# Needs root (or CAP_SYS_ADMIN and CAP_SYS_CHROOT).
#
# It is a way to try an image, not a sandbox: the process is root and shares
# this host's network and users. Run only images you built or trust.
#
#   deploy/container/run.sh target/container/hetero-image.tar local /opt/hetero/examples/fashion-mnist-subset.toml
set -euo pipefail
archive=${1:?usage: run.sh IMAGE.tar HETERO-ARGS…}
shift
root=$(mktemp -d /tmp/hetero-image.XXXXXX)
# The mounts live in the namespace and end with it; the folder is removed here.
trap 'rm -rf --one-file-system "$root"' EXIT
python3 - "$archive" "$root" <<'PY'
import hashlib, json, sys, tarfile
archive, root = sys.argv[1], sys.argv[2]


def blob(oci, descriptor):
    """The blob a descriptor names, checked against its digest and size."""
    algorithm, _, digest = descriptor["digest"].partition(":")
    if algorithm != "sha256" or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        sys.exit(f"{archive}: unsupported digest {descriptor['digest']!r}")
    member = oci.extractfile("blobs/sha256/" + digest)
    sha, size = hashlib.sha256(), 0
    spool = __import__("tempfile").TemporaryFile()
    for chunk in iter(lambda: member.read(1 << 20), b""):
        sha.update(chunk)
        size += len(chunk)
        spool.write(chunk)
    if sha.hexdigest() != digest or size != descriptor.get("size", size):
        sys.exit(f"{archive}: blob {digest[:12]}… does not match its digest or size: the archive is damaged")
    spool.seek(0)
    return spool


with tarfile.open(archive) as oci:
    index = json.load(oci.extractfile("index.json"))
    manifest = json.load(blob(oci, index["manifests"][0]))
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=blob(oci, layer), mode="r:gz") as t:
            # "data": no device files, no links out of the folder, no setuid bits.
            t.extractall(root + "/rootfs", filter="data")
    config = json.load(blob(oci, manifest["config"]))["config"]
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
  mount -t tmpfs -o mode=755 tmpfs "$root/dev"
  for node in null zero random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
  done
  mount -t tmpfs tmpfs "$root/tmp"
  exec "$@"
' run "$rootfs" "$workdir" env -i "${env[@]}" unshare --root="$rootfs" --wd="$workdir" /usr/local/bin/hetero "$@"
