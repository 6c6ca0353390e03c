"""`make yaml-contract`: every shipped Breakwater configuration means the same to every YAML reader.

Reads every shipped YAML file (envoy/, docker-compose material, the Istio recipes) and the
README's yaml/json blocks with a YAML 1.1 reader (as kubectl and Helm read) and a YAML 1.2
reader, and checks:
- both readers give the same documents, so the same plugin configuration;
- each plugin configuration is collected as the plugin receives it: the Wasm filter's
  StringValue for Envoy, `pluginConfig` converted as istiod converts it for a WasmPlugin;
- every key and enum word of the configuration contract (the string literals of
  plugin/src/config.rs) reads as the same string in both readers, written bare;
- the compose file's Envoy config is one of the files read here.
It writes the configurations to OUT/readings.json; `cargo test -p breakwater --test examples
-- --ignored` then has the plugin's own parser check each one (see plugin/tests/examples.rs).
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meshyaml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not shipped: build output, Istio's CRDs, and test fixtures (which may hold YAML 1.1 traps on purpose).
SKIP_DIRS = {".git", ".venv", "target", "crds", "tmp", "tests"}

# Shipped configurations the plugin is known to refuse, and why; each must still be refused with
# exactly this message (so the entry goes when the text is fixed). Keyed by file and a line of
# the block.
KNOWN_REFUSALS: dict = {}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def rel(path):
    return os.path.relpath(path, ROOT)


def shipped_yaml_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith((".yaml", ".yml")):
                yield os.path.join(top, f)


def readme_blocks(path):
    """(first line number, language, text) of each ```yaml / ```json block."""
    blocks, lang, start, lines = [], None, 0, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fence = line.strip()
            if lang is None and fence in ("```yaml", "```json"):
                lang, start, lines = fence[3:], n + 1, []
            elif lang is not None and fence == "```":
                blocks.append((start, lang, "".join(lines)))
                lang = None
            elif lang is not None:
                lines.append(line)
    return blocks


def read_each(text):
    """The documents as the API server would store them, by reader (or why a reader refused)."""
    views = {}
    for name, read in meshyaml.READERS.items():
        try:
            views[name] = [meshyaml.to_kube_json(d) for d in read(text)]
        except Exception as e:  # a reader refusing the text is a finding too
            views[name] = f"unreadable: {e}"
    return views


def read_both(text, where):
    """The documents both readers agree on; None (and a failure) if they differ."""
    (n11, v11), (n12, v12) = read_each(text).items()
    if v11 != v12:
        fail(f"{where}: {n11} and {n12} read different documents:\n  {n11}: {v11}\n  {n12}: {v12}")
        return None
    if isinstance(v11, str):
        fail(f"{where}: {v11}")
        return None
    return v11


PLUGIN_KEYS = {"policies", "routes", "policy", "sync_interval", "control"}


def is_plugin_configuration(doc):
    """A bare plugin configuration: only the plugin's top-level keys, and `routes` (if any) a list
    (the README also shows `breakwater per-route` output, whose `routes` is a map of Envoy routes)."""
    return (isinstance(doc, dict) and doc.keys() <= PLUGIN_KEYS and bool(doc.keys() & {"policies", "routes", "control"})
            and isinstance(doc.get("routes", []), list))


def configurations_in(docs, where, text):
    """(source, configuration string) for each plugin configuration in a file's documents."""
    found = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "WasmPlugin":
            meta = d.get("metadata", {})
            found.append((f"{where}: WasmPlugin {meta.get('namespace')}/{meta.get('name')}",
                          meshyaml.istio_plugin_config(d)))
        elif is_plugin_configuration(d):
            # A bare configuration (the README's): what a WasmPlugin's pluginConfig would carry.
            found.append((f"{where}: configuration", meshyaml.protojson_struct(d)))
        for path, value in meshyaml.wasm_filter_configurations(d):
            found.append((f"{where}: {path}", value))
    return found


def check_readers():
    """The readers are what they claim to be (else every later check could pass vacuously)."""
    sample = "on: 1\nretry: { on: [5xx] }\nn: 010\nt: 1:30\n"
    got11 = meshyaml.read_yaml11(sample)[0]
    got12 = meshyaml.read_yaml12(sample)[0]
    if got11 != {True: 1, "retry": {True: ["5xx"]}, False: 8, "t": 90}:
        fail(f"the YAML 1.1 reader is not YAML 1.1: {got11}")
    if got12 != {"on": 1, "retry": {"on": ["5xx"]}, "n": 10, "t": "1:30"}:
        fail(f"the YAML 1.2 reader is not YAML 1.2: {got12}")
    # The comparison must catch the issue-11 manifest (retry: { on: [...] }).
    a, b = read_each("retry: { on: [5xx] }\n").values()
    if a == b:
        fail("a bare `on:` key reads the same in both readers: the comparison cannot fail")
    else:
        print("ok   self-check: the readers differ on a bare `on:` key, as they must")


def contract_words():
    """Every plain word among the string literals of the plugin's configuration parser
    (plugin/src/config.rs and plugin/src/config/, tests and the fuzzer's inputs left out): its
    keys and enum values."""
    files = [os.path.join(ROOT, "plugin/src/config.rs")]
    for top, _, names in os.walk(os.path.join(ROOT, "plugin/src/config")):
        files += [os.path.join(top, n) for n in names if n.endswith(".rs") and "test" not in n and "fuzz" not in n]
    src = "".join(open(f, encoding="utf-8").read() for f in files)
    words = set(re.findall(r'"([A-Za-z0-9][A-Za-z0-9_\-]*)"', src))
    # The parser names `on` only to refuse it with the reason (the key is retry_on).
    return sorted(words - {"on"})


def check_contract_words():
    risky = []
    for w in contract_words():
        for form in (f"{w}: x\n", f"k: {w}\n", f"k: [{w}]\n"):
            a = [meshyaml.to_kube_json(d) for d in meshyaml.read_yaml11(form)]
            b = [meshyaml.to_kube_json(d) for d in meshyaml.read_yaml12(form)]
            if a != b:
                risky.append(f"{form.strip()!r}: {a} vs {b}")
    words = contract_words()
    if len(words) < 50 or "retry_on" not in words or "dry_run" not in words:
        fail(f"found only {len(words)} words in the plugin's configuration parser: the scan is broken")
    if risky:
        for r in risky:
            fail(f"a contract word reads differently in YAML 1.1 and 1.2: {r}")
    else:
        print(f"ok   {len(words)} keys and enum words of the plugin's configuration read the same bare in both readers")


def check_compose(path, docs, read_files):
    for d in docs:
        for name, svc in (d.get("services") or {}).items():
            cmd = svc.get("command") or []
            if "-c" in cmd:
                target = os.path.normpath(os.path.join(ROOT, cmd[cmd.index("-c") + 1]))
                if target not in read_files:
                    fail(f"{rel(path)}: service {name} runs Envoy with {rel(target)}, which this check did not read")
                else:
                    print(f"ok   {rel(path)}: service {name} runs {rel(target)}, read here")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for readings.json")
    args = ap.parse_args()

    check_readers()
    check_contract_words()

    readings = []
    files = list(shipped_yaml_files())
    read_files = set(files)
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = read_both(text, rel(path))
        if docs is None:
            continue
        print(f"ok   {rel(path)}: {len(docs)} document(s) read the same")
        if any(isinstance(d, dict) and "services" in d for d in docs):
            check_compose(path, docs, read_files)
        readings += [(s, c, text) for s, c in configurations_in(docs, rel(path), text)]

    readme = os.path.join(ROOT, "README.md")
    for line, lang, text in readme_blocks(readme):
        where = f"README.md line {line} ({lang})"
        docs = read_both(text, where)
        if docs is None:
            continue
        print(f"ok   {where}: reads the same")
        readings += [(s, c, text) for s, c in configurations_in(docs, where, text)]

    out = []
    for source, config, text in readings:
        refused = None
        for (file, marker), message in KNOWN_REFUSALS.items():
            if source.startswith(file) and marker in text:
                refused = message
        if config is None:
            fail(f"{source}: no configuration (Istio would send the plugin an empty one)")
            continue
        out.append({"source": source, "configuration": config, "refused_with": refused})

    wasmplugins = [r for r in out if r["source"].startswith("envoy/istio/") and "WasmPlugin" in r["source"]]
    if len(wasmplugins) < 3:
        fail(f"expected the three Istio recipes' WasmPlugins under envoy/istio/, found {len(wasmplugins)}")
    if not any(r["source"].startswith("envoy/envoy.yaml") for r in out):
        fail("no plugin configuration found in envoy/envoy.yaml")
    if not any(r["source"].startswith("README.md") for r in out):
        fail("no plugin configuration found in README.md")
    for marker in KNOWN_REFUSALS:
        if not any(r["refused_with"] == KNOWN_REFUSALS[marker] for r in out):
            fail(f"KNOWN_REFUSALS entry {marker} matched nothing: remove it")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "readings.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"{len(out)} plugin configurations written to {os.path.join(args.out, 'readings.json')}:")
    for r in out:
        note = f"  (known refusal: {r['refused_with']})" if r["refused_with"] else ""
        print(f"     {r['source']}{note}")
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
