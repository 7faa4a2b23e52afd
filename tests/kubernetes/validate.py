#!/usr/bin/env python3
"""Validates Kubernetes manifests against schemas, offline.

Built-in kinds: the Kubernetes JSON schemas that the PyPI package kubernetes-validate
ships, strict (unknown fields are errors). Prometheus Operator kinds (ServiceMonitor,
PodMonitor): the models that cloudcoil-models-prometheus-operator generates from the
operator's CRD schemas; pydantic ignores unknown fields, so every document must also
survive a round trip through its model unchanged (an unknown or mistyped field does
not).

Usage: validate.py FILE...   Exit 0: all valid; 1: some invalid (each error printed);
3: the schema packages are not installed.
"""
import sys

try:
    import yaml
    import kubernetes_validate
    from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
except ImportError as e:
    print(f"missing: {e} (pip install kubernetes-validate cloudcoil-models-prometheus-operator)")
    sys.exit(3)

KUBERNETES_VERSION = "1.33"
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): prometheus_operator.PodMonitor,
}


def differences(given, kept, path=""):
    """Where `kept` (the model's view) differs from `given` (the manifest)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}.{key}: not a field of the schema")
            else:
                out.extend(differences(value, kept[key], f"{path}.{key}"))
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        out = []
        for n, (a, b) in enumerate(zip(given, kept)):
            out.extend(differences(a, b, f"{path}[{n}]"))
        return out
    if given != kept:
        return [f"{path}: {given!r} is read as {kept!r}"]
    return []


def validate(doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    model = CRDS.get(key)
    if model is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return []
    parsed = model.model_validate(doc)
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return differences(doc, kept)


def main(paths):
    failed = False
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            print(f"{path}: no documents")
            failed = True
        for doc in docs:
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                problems = validate(doc)
            except Exception as e:  # schema errors of either kind, missing schemas
                problems = [str(getattr(e, "message", e)).splitlines()[0]]
            if problems:
                failed = True
                for problem in problems:
                    print(f"INVALID {name}: {problem}")
            else:
                print(f"valid {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
