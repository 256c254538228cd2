#!/usr/bin/env python3
"""Writes an OCI image archive of one layer: the folder ROOTFS, with the config
(ENV, WORKDIR, ENTRYPOINT, CMD) that CONTAINERFILE gives a `FROM scratch` image.

  oci_archive.py CONTAINERFILE ROOTFS OUT.tar NAME:TAG

The layer is reproducible: entries sorted, owned by root, dated at the epoch.
"""
import gzip
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile


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


def layer_of(rootfs):
    """The gzip'd tar of ROOTFS and the sha256 of the uncompressed tar."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
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
    data = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    return gzip.compress(data, compresslevel=6, mtime=0), diff_id


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    containerfile, rootfs, out, name = sys.argv[1:]
    layer, diff_id = layer_of(rootfs)
    config = {
        "architecture": "amd64",
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
    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar+gzip")
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
    print(f"image: {out} ({name}, layer {len(layer) / 1e6:.0f} MB, {manifest_desc['digest'][:19]}…)")


if __name__ == "__main__":
    main()
