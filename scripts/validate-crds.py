#!/usr/bin/env python3
"""Validates the custom resources in Kubernetes manifests (stdin or files) against their CRDs.

    helm template ... | .tools/venv/bin/python scripts/validate-crds.py -

kubernetes-validate knows only Kubernetes' own kinds and merely warns about others. The chart's
custom resources are checked here instead, against the JSON schemas of the pydantic models that
the PyPI packages cloudcoil-models-prometheus-operator and cloudcoil-models-keda generate from
prometheus-operator's and KEDA's published CRDs (scripts/tools.sh pins the versions). Strict like
`kubernetes-validate --strict`: every object that declares its properties refuses others, so a
misspelt field fails as it would under `kubectl apply --validate=strict`. Objects of other kinds
are left to kubernetes-validate; a custom kind with no model here fails (add its model, or it
goes unchecked). Prints one line per object; exits 1 if any failed.
"""

import copy
import sys

import jsonschema
import yaml

# (apiVersion, kind) -> (module, class)
MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("cloudcoil.models.prometheus_operator.v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("cloudcoil.models.keda.v1alpha1", "TriggerAuthentication"),
}
# Kubernetes' own API groups: kubernetes-validate's business.
BUILTIN_GROUPS = {
    "v1", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io",
}


def strict(schema):
    """A copy of `schema` where every object listing its properties refuses any other."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def schema_for(api_version, kind, cache={}):
    key = (api_version, kind)
    if key not in cache:
        module_name, class_name = MODELS[key]
        module = __import__(module_name, fromlist=[class_name])
        model = getattr(module, class_name)
        cache[key] = strict(model.model_json_schema(by_alias=True, mode="validation"))
    return cache[key]


def main(paths):
    docs = []
    for path in paths or ["-"]:
        text = sys.stdin.read() if path == "-" else open(path).read()
        docs += [d for d in yaml.safe_load_all(text) if d]
    failed = checked = 0
    for doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
        group = api_version.split("/")[0] if "/" in api_version else "v1"
        if group in BUILTIN_GROUPS:
            continue
        checked += 1
        if (api_version, kind) not in MODELS:
            print(f"FAIL {name}: no schema for {api_version} {kind} here (add its model to scripts/validate-crds.py)")
            failed += 1
            continue
        validator = jsonschema.Draft202012Validator(schema_for(api_version, kind))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            failed += 1
            for e in errors[:10]:
                # Under anyOf (nullable fields), the branch that got deepest says what is wrong.
                while e.context:
                    e = max(e.context, key=lambda c: (len(c.absolute_path), c.validator != "type"))
                path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                print(f"FAIL {name} ({api_version}): {path}: {e.message[:300]}")
        else:
            print(f"ok   {name} ({api_version}) against its CRD's model")
    if checked == 0:
        print("no custom resources in the input")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
