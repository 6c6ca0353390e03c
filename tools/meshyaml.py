"""How Breakwater's shipped YAML reaches the plugin, read as the mesh reads it.

Two readers:
- `read_yaml11`: YAML 1.1 as kubectl and Helm read it (sigs.k8s.io/yaml, a go-yaml v2 fork): PyYAML's
  YAML 1.1 resolver, plus what go-yaml v2 adds: bare y/Y/n/N are booleans and 1e-1 is a float;
  timestamps stay strings (go-yaml v2 keeps them strings when decoding into interface{}).
  PyYAML also reads sexagesimal numbers (go-yaml v2 does not), so it flags more, never less.
  A bare `on:` key becomes the boolean true, `010` is octal 8, `1:30` is sexagesimal 90.
- `read_yaml12`: YAML 1.2 (ruamel.yaml's pure-Python loader): `on` is a string, `010` is 10.

`to_kube_json` turns what a reader gave into the JSON the API server stores (keys become
strings as sigs.k8s.io/yaml makes them), and `istio_plugin_config` turns a WasmPlugin's
`pluginConfig` into the JSON string istiod hands the plugin: the API server's JSON read into a
protobuf Struct (every number a double) and written by protojson (sorted keys, Go's number format).

Run as a script, `python tools/meshyaml.py kubectl FILE` prints FILE's documents as kubectl
sends them and each WasmPlugin's plugin configuration as istiod converts it (used by the
Istio-shaped Envoy tests in integration/src/istio.rs).
"""

import datetime
import decimal
import io
import json
import math
import re
import sys

import yaml
from ruamel.yaml import YAML


class Kubectl11Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 safe loader, adjusted to read scalars as go-yaml v2 (kubectl) does."""


# go-yaml v2 reads y/Y/n/N as booleans too; PyYAML leaves them strings.
_BOOL = re.compile(
    r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$"
)
Kubectl11Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "yYnN":
    Kubectl11Loader.yaml_implicit_resolvers.setdefault(_first, [])
    Kubectl11Loader.yaml_implicit_resolvers[_first] = [
        (t, r) for t, r in Kubectl11Loader.yaml_implicit_resolvers[_first] if t != "tag:yaml.org,2002:bool"
    ]
    Kubectl11Loader.yaml_implicit_resolvers[_first].insert(0, ("tag:yaml.org,2002:bool", _BOOL))


# go-yaml v2 also reads a float without a dot, such as 1e-1; PyYAML leaves it a string.
for _first in "-+0123456789":
    Kubectl11Loader.yaml_implicit_resolvers.setdefault(_first, []).append(
        ("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"))
    )


def _construct_bool(loader, node):
    return loader.construct_scalar(node) in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")


Kubectl11Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def read_yaml11(text):
    """Every document of `text`, read as YAML 1.1 (kubectl, Helm)."""
    return [d for d in yaml.load_all(text, Loader=Kubectl11Loader) if d is not None]


def read_yaml12(text):
    """Every document of `text`, read as YAML 1.2."""
    reader = YAML(typ="safe", pure=True)  # the C loader would be YAML 1.1
    reader.version = (1, 2)
    return [d for d in reader.load_all(io.StringIO(text)) if d is not None]


READERS = {"YAML 1.1 (kubectl, Helm)": read_yaml11, "YAML 1.2": read_yaml12}


def _go_g(x):
    """Go's strconv.FormatFloat(x, 'g', -1, 64), as sigs.k8s.io/yaml writes a float map key."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def to_kube_json(value):
    """The JSON value the API server stores for a YAML value (sigs.k8s.io/yaml's YAMLToJSON)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool):
                key = "true" if k else "false"
            elif k is None:
                key = "null"
            elif isinstance(k, int):
                key = str(k)
            elif isinstance(k, float):
                key = _go_g(k)
            else:
                key = str(k)
            out[key] = to_kube_json(v)
        return out
    if isinstance(value, list):
        return [to_kube_json(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"{value!r} has no JSON form: the API server refuses it")
    return value


def _protojson_number(x):
    """A double as protojson writes it: Go's 'f' format for 1e-6 <= |x| < 1e21, else 'e'."""
    x = float(x)  # a Struct number is a double: integers past 2^53 lose precision here, as in Istio
    if x == 0:
        return "0"
    if 1e-6 <= abs(x) < 1e21:
        return format(decimal.Decimal(repr(x)).normalize(), "f")
    mantissa, exp = repr(x).split("e")
    if exp.startswith("-"):
        return f"{mantissa}e-{int(exp[1:])}"  # protojson drops the exponent's leading zero
    return f"{mantissa}e+{int(exp.lstrip('+')):02d}"


def protojson_struct(value):
    """`value` (JSON) as protojson writes a google.protobuf.Value: sorted keys, doubles."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode())
        return "{" + ",".join(json.dumps(k) + ":" + protojson_struct(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(protojson_struct(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return _protojson_number(value)
    return json.dumps(value, ensure_ascii=False)


def istio_plugin_config(doc):
    """The configuration string istiod gives the plugin for a WasmPlugin document (as read by a
    reader), or None when it has no pluginConfig (Istio then sends an empty configuration)."""
    cfg = to_kube_json(doc).get("spec", {}).get("pluginConfig")
    if not cfg:
        return None
    return protojson_struct(cfg)


def wasm_filter_configurations(value, path=""):
    """(path, configuration text) of every Envoy Wasm filter configuration (a StringValue) in an
    Envoy config document: `envoy.extensions.filters.http.wasm.v3.Wasm` typed configs."""
    found = []
    if isinstance(value, dict):
        if str(value.get("@type", "")).endswith("envoy.extensions.filters.http.wasm.v3.Wasm"):
            configuration = value.get("config", {}).get("configuration", {})
            if "value" in configuration:
                found.append((path + ".config.configuration.value", configuration["value"]))
        for k, v in value.items():
            found += wasm_filter_configurations(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += wasm_filter_configurations(v, f"{path}[{i}]")
    return found


def kubectl_view(path):
    """What the Istio-shaped tests need from a manifest file: its documents as the API server
    stores them (read as kubectl reads them) and each WasmPlugin's configuration as istiod
    converts it, keyed by `<namespace>/<name>`."""
    with open(path, encoding="utf-8") as f:
        docs = [to_kube_json(d) for d in read_yaml11(f.read())]
    plugin_configs = {}
    for d in docs:
        if d.get("kind") == "WasmPlugin":
            meta = d.get("metadata", {})
            key = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
            plugin_configs[key] = istio_plugin_config(d)
    return {"documents": docs, "plugin_configs": plugin_configs}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "kubectl":
        sys.exit("usage: meshyaml.py kubectl FILE")
    json.dump(kubectl_view(sys.argv[2]), sys.stdout)
    print()
