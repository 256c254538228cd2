#!/usr/bin/env python3
"""Renders every kustomization under deploy/kubernetes and validates it offline.

- Core kinds (Service, StatefulSet, DaemonSet, Job, ConfigMap) are checked against
  the Kubernetes schemas that PyPI's kubernetes-validate ships, strictly: an
  unknown field is an error.
- JobSet and LeaderWorkerSet are checked against their own CRDs' schemas
  (schemas/, taken from kubernetes-sigs/jobset and kubernetes-sigs/lws), also
  strictly. Their embedded templates are cut out of those schemas and checked
  as the core kinds they are: a JobSet's job template as a batch/v1 Job, and a
  LeaderWorkerSet's leader and worker templates as v1 Pods.

  python3 deploy/kubernetes/validate.py [--json OUT]   (needs kubectl, or KUBECTL=PATH, and kubernetes-validate)

--json writes every rendered object, by kustomization, for tests/launch.rs to
read. Exit 0: everything valid; 1: the errors are printed, naming the object.
"""
import json
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "1.33.0"
KUSTOMIZATIONS = [
    "base",
    "overlays/nvidia",
    "overlays/amd",
    "overlays/ascend",
    "jobset",
    "indexed-job",
    "leaderworkerset",
]
CRDS = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset-v1alpha2.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
}


def strict(schema):
    """Rejects unknown fields: every object with properties, unless the CRD
    keeps unknown fields there on purpose."""
    if isinstance(schema, dict):
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def core(obj, where, errors):
    try:
        kubernetes_validate.validate(obj, VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{where}: {e.message} at {'.'.join(str(p) for p in e.path)}")
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(f"{where}: no schema: {e}")


def custom(obj, where, errors):
    key = (obj["apiVersion"], obj["kind"])
    with open(os.path.join(HERE, "schemas", CRDS[key])) as f:
        schema = strict(json.load(f))
    for e in jsonschema.Draft7Validator(schema).iter_errors(obj):
        errors.append(f"{where}: {e.message} at {'.'.join(str(p) for p in e.absolute_path)}")
    name = obj["metadata"]["name"]
    if obj["kind"] == "JobSet":
        for job in obj["spec"].get("replicatedJobs", []):
            template = job["template"]
            wrapped = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-{job['name']}"}}
            wrapped.update({k: v for k, v in template.items() if k != "metadata"})
            core(wrapped, f"{where} replicatedJobs[{job['name']}].template", errors)
    else:
        templates = obj["spec"]["leaderWorkerTemplate"]
        for part in ("leaderTemplate", "workerTemplate"):
            if part in templates:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-{part}"}}
                pod["spec"] = templates[part]["spec"]
                core(pod, f"{where} {part}", errors)


def main():
    out = None
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        out = sys.argv[2]
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    errors, rendered = [], {}
    for k in KUSTOMIZATIONS:
        text = subprocess.run(
            [os.environ.get("KUBECTL", "kubectl"), "kustomize", os.path.join(HERE, k)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        objects = [o for o in yaml.safe_load_all(text) if o]
        rendered[k] = objects
        for obj in objects:
            where = f"{k}: {obj['kind']}/{obj['metadata']['name']}"
            if (obj["apiVersion"], obj["kind"]) in CRDS:
                custom(obj, where, errors)
            else:
                core(obj, where, errors)
        print(f"{k}: {len(objects)} object(s) rendered and checked")
    if out:
        with open(out, "w") as f:
            json.dump(rendered, f)
    for e in errors:
        print("error:", e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
