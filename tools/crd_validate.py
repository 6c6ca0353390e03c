"""`make istio-crds`: every shipped Istio manifest validates, strictly, against Istio's own CRDs.

The CRD schemas were fetched once into envoy/istio/crds/istio-<version>.yaml (see the README
there); nothing is downloaded here. Each manifest under envoy/istio/ is read as kubectl reads
it (YAML 1.1, see tools/meshyaml.py) and validated against the schema of its kind and version,
for every Istio version in crds/, as the API server would with kubectl's default
`--validate=strict`: an unknown field is an error, except where the schema says
`x-kubernetes-preserve-unknown-fields` (a WasmPlugin's pluginConfig: Breakwater checks that
itself). `metadata` is checked against the ObjectMeta fields manifests use. ConfigMaps (a core
kind, no CRD) are checked against a small strict schema written here.

Not checked: the CRDs' CEL rules (`x-kubernetes-validations`, e.g. "only one of targetRefs or
selector"), which need the API server; they are counted in the output.

Negative checks, so this cannot pass vacuously: for every object in every shipped manifest
(outside pluginConfig, and not a map such as labels), the same manifest with one unknown field added there must be refused,
and a typo'd `failStrategy` must be refused with a message naming it. The WasmPlugin CRD of
Istio 1.26 (crds/before-fail-reload/) must refuse each shipped WasmPlugin for its FAIL_RELOAD
alone: Istio 1.27 added it.
"""

import copy
import glob
import json
import os
import re
import sys

import jsonschema

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meshyaml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISTIO_DIR = os.path.join(ROOT, "envoy", "istio")
TYPO = "nmae"

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

CONFIGMAP = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
        "binaryData": {"type": "object", "additionalProperties": {"type": "string"}},
        "immutable": {"type": "boolean"},
    },
}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def strict(schema, cel_rules):
    """A copy of a CRD's structural schema in which objects refuse unknown fields, as the API
    server does under strict field validation; `nullable` becomes a JSON-schema null type."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        cel_rules[0] += len(node.get("x-kubernetes-validations", []))
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        is_object = node.get("type") == "object" or "properties" in node
        if is_object and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("anyOf", "oneOf", "allOf"):
            for child in node.get(key, []):
                walk(child)

    walk(s)
    return s


def load_crds(folder=os.path.join(ISTIO_DIR, "crds")):
    """{istio version: {(group, version, kind): (strict schema, CEL rule count)}}"""
    by_version = {}
    for path in sorted(glob.glob(os.path.join(folder, "istio-*.yaml"))):
        istio = re.search(r"istio-(.+)\.yaml$", path).group(1)
        schemas = {}
        with open(path, encoding="utf-8") as f:
            for crd in meshyaml.read_yaml11(f.read()):
                spec = crd["spec"]
                for v in spec["versions"]:
                    if not v.get("served"):
                        continue
                    cel = [0]
                    body = strict(v["schema"]["openAPIV3Schema"], cel)
                    schemas[(spec["group"], v["name"], spec["names"]["kind"])] = (body, cel[0])
        by_version[istio] = schemas
    return by_version


def top_schema(api_version, kind, body):
    """The whole object: apiVersion, kind and metadata as the API server checks them, plus the
    kind's own schema for the rest."""
    s = copy.deepcopy(body)
    s.setdefault("properties", {})
    s["properties"]["apiVersion"] = {"const": api_version}
    s["properties"]["kind"] = {"const": kind}
    s["properties"]["metadata"] = OBJECT_META
    s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
    s["additionalProperties"] = False
    return s


def schema_for(doc, schemas):
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api_version == "v1" and kind == "ConfigMap":
        return top_schema(api_version, kind, CONFIGMAP), 0
    group, _, version = api_version.rpartition("/")
    found = schemas.get((group, version, kind))
    if found is None:
        return None, 0
    return top_schema(api_version, kind, found[0]), found[1]


def errors(doc, schema):
    v = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in v.iter_errors(doc))


def object_paths(value, path=()):
    """Paths of every object in a manifest, outside pluginConfig (preserved unknown fields)."""
    if isinstance(value, dict):
        yield path
        for k, v in value.items():
            if k != "pluginConfig":
                yield from object_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from object_paths(v, path + (i,))


def is_map(schema, path):
    """Whether the schema makes the object at `path` a map (any key, e.g. labels), not a struct."""
    node = schema
    for p in path:
        if isinstance(p, int):
            node = node.get("items", {})
        elif p in node.get("properties", {}):
            node = node["properties"][p]
        else:
            node = node.get("additionalProperties", {})
        if not isinstance(node, dict):
            return False
    return isinstance(node.get("additionalProperties"), dict)


def with_typo(doc, path):
    d = copy.deepcopy(doc)
    node = d
    for p in path:
        node = node[p]
    node[TYPO] = "x"
    return d


def manifests():
    for path in sorted(glob.glob(os.path.join(ISTIO_DIR, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            docs = [meshyaml.to_kube_json(d) for d in meshyaml.read_yaml11(f.read())]
        yield os.path.relpath(path, ROOT), docs


def main():
    crds = load_crds()
    if not crds:
        fail("no CRDs found under envoy/istio/crds/")
    checked = 0
    for istio, schemas in crds.items():
        for file, docs in manifests():
            for doc in docs:
                what = f"{file}: {doc.get('kind')} {doc.get('metadata', {}).get('namespace')}/{doc.get('metadata', {}).get('name')}"
                schema, cel = schema_for(doc, schemas)
                if schema is None:
                    fail(f"{what}: Istio {istio} has no served {doc.get('apiVersion')} {doc.get('kind')}")
                    continue
                errs = errors(doc, schema)
                if errs:
                    fail(f"{what}: refused by Istio {istio}'s schema:\n  " + "\n  ".join(errs))
                    continue
                # The same manifest with an unknown field in any one of its objects is refused.
                paths = [p for p in object_paths(doc) if not is_map(schema, p)]
                missed = [p for p in paths if not any(TYPO in e for e in errors(with_typo(doc, p), schema))]
                if missed:
                    fail(f"{what}: an unknown field was accepted at {['.'.join(map(str, p)) or '(top)' for p in missed]}")
                    continue
                checked += 1
                cel_note = f"; {cel} CEL rules in the schema not evaluated" if cel else ""
                print(f"ok   {what}: valid against Istio {istio}, and an unknown field in any of its "
                      f"{len(paths)} objects is refused{cel_note}")
        # One typo shown in full, as a user would meet it.
        for file, docs in manifests():
            for doc in docs:
                if doc.get("kind") == "WasmPlugin":
                    bad = copy.deepcopy(doc)
                    bad["spec"]["failStratgy"] = bad["spec"].pop("failStrategy")
                    errs = errors(bad, schema_for(bad, schemas)[0])
                    if any("failStratgy" in e for e in errs):
                        print(f"ok   {file} with `failStratgy:` is refused by Istio {istio}: {errs[0]}")
                    else:
                        fail(f"{file}: a typo'd failStrategy was accepted by Istio {istio}'s schema")
                    break
            else:
                continue
            break
    # The last Istio before FAIL_RELOAD refuses the shipped WasmPlugins, and for that alone.
    for istio, schemas in load_crds(os.path.join(ISTIO_DIR, "crds", "before-fail-reload")).items():
        for file, docs in manifests():
            for doc in (d for d in docs if d.get("kind") == "WasmPlugin"):
                errs = errors(doc, schema_for(doc, schemas)[0])
                if len(errs) == 1 and errs[0].startswith("spec.failStrategy: 'FAIL_RELOAD' is not one of"):
                    print(f"ok   {file}: Istio {istio} refuses it, only for FAIL_RELOAD: {errs[0]}")
                else:
                    fail(f"{file}: expected Istio {istio} to refuse FAIL_RELOAD and nothing else, got {errs}")
    if checked == 0:
        fail("no manifest was validated")
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)
    print(f"{checked} manifest documents valid against {len(crds)} Istio version(s): {', '.join(crds)}")


if __name__ == "__main__":
    main()
