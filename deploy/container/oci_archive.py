#!/usr/bin/env python3
"""Writes an OCI image archive of one layer: the folder ROOTFS, with the config
(ENV, WORKDIR, ENTRYPOINT, CMD) that CONTAINERFILE gives a `FROM scratch` image.

  oci_archive.py CONTAINERFILE ROOTFS OUT.tar NAME:TAG ARCH

ARCH is the image's architecture as OCI names it (amd64, arm64). The layer is
reproducible: entries sorted, owned by root, dated at the epoch. It is written
through temporary files, so an image with models in it never sits in memory.
"""
import gzip
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile
import tempfile


def config_of(containerfile):
    """ENV, WORKDIR, ENTRYPOINT and CMD of a FROM scratch Containerfile."""
    env, workdir, entrypoint, cmd = [], "/", None, None
    with open(containerfile) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            word = word.upper()
            if word == "FROM":
                if rest.strip() != "scratch":
                    sys.exit(f"{containerfile}: only FROM scratch is built here, not {rest!r}")
            elif word == "ENV":
                for pair in shlex.split(rest):
                    env.append(pair)
            elif word == "WORKDIR":
                workdir = rest.strip()
            elif word == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif word == "CMD":
                cmd = json.loads(rest)
            elif word != "COPY":
                sys.exit(f"{containerfile}: {word} is not supported here")
    return {"Env": env, "WorkingDir": workdir, "Entrypoint": entrypoint, "Cmd": cmd}


class Hashing(io.RawIOBase):
    """A write-only stream that hashes what passes through to `inner`."""

    def __init__(self, inner):
        self.inner, self.sha, self.size = inner, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)


def layer_of(rootfs, out):
    """Writes the gzip'd tar of ROOTFS to the file OUT; returns the sha256 of the
    uncompressed tar (the layer's diff id)."""
    gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
    raw = Hashing(gz)
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(top, name)
                info = tar.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    gz.close()
    return "sha256:" + raw.sha.hexdigest()


def file_digest(f):
    """The sha256 and size of the open file F, read from its start."""
    f.seek(0)
    sha, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
        size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    containerfile, rootfs, out, name, arch = sys.argv[1:]
    layer_file = tempfile.TemporaryFile()
    diff_id = layer_of(rootfs, layer_file)
    layer_digest, layer_size = file_digest(layer_file)
    config = {
        "architecture": arch,
        "os": "linux",
        "config": config_of(containerfile),
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "deploy/container/build.sh: FROM scratch, COPY rootfs/ /"}],
    }
    blobs = {}

    def blob(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config_desc = blob(json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob(json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    repo, _, tag = name.partition(":")
    manifest_desc["annotations"] = {
        "org.opencontainers.image.ref.name": tag or "latest",
        "io.containerd.image.name": f"docker.io/library/{repo}:{tag or 'latest'}",
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    with tarfile.open(out, "w") as tar:

        def add(arcname, data):
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
        info = tarfile.TarInfo("blobs/sha256/" + layer_digest.split(":", 1)[1])
        info.size, info.mtime = layer_size, 0
        layer_file.seek(0)
        tar.addfile(info, layer_file)
    print(f"image: {out} ({name}, {arch}, layer {layer_size / 1e6:.0f} MB, {manifest_desc['digest'][:19]}…)")


if __name__ == "__main__":
    main()
