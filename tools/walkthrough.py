"""Runs the demo walk-through exactly as a user pastes it, against the demo on localhost:10000.

Two walk-throughs, each a list of shell lines:
- `readme`: the README's (the first ```sh block that talks to localhost:10000 and is not `make`);
- `demo`: what `make run` prints (`tools/demo.sh --commands`).
Each command line (comments and blank lines skipped) must parse on its own (`bash -n`), then
runs with bash and its output is checked against what the walk-through says it shows. The
expectations are listed below in order, one per command line, so a walk-through that changes
without them fails here.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def statuses(out):
    return [int(m) for m in re.findall(r"^HTTP/[\d.]+ (\d{3})", out, re.M)]


def words(out):
    return out.split()


def sorted_lines(out):
    return sorted(line.strip() for line in out.strip().splitlines())


BULKHEAD = sorted(["200", "200", "503 queue-timeout", "503 queue-timeout", "503 bulkhead-full", "503 bulkhead-full"])
HEALTHY = ("a 200 from the upstream", lambda o: statuses(o) == [200] and "x-upstream: breakwater-upstream" in o)
TRIP = ("five 500s", lambda o: words(o) == ["500"] * 5)
FAST_FAIL = ("a 503 from Breakwater: x-breakwater: circuit-open and retry-after",
             lambda o: statuses(o) == [503] and "x-breakwater: circuit-open" in o and "retry-after:" in o
             and "x-upstream" not in o)
BULKHEAD_CHECK = ("two 200s, two queue-timeouts, two bulkhead-full", lambda o: sorted_lines(o) == BULKHEAD)
RETRIES = ("nine 200s", lambda o: words(o) == ["200"] * 9)
STATS = ("Breakwater's Prometheus stats", lambda o: re.search(r'^breakwater_requests(_total)?\{[^}]*policy="checkout"', o, re.M))

EXPECT = {
    "readme": [
        HEALTHY, TRIP, FAST_FAIL,
        ("the probe's 200", lambda o: statuses(o) == [200]),
        BULKHEAD_CHECK, RETRIES, STATS,
    ],
    "demo": [
        HEALTHY, TRIP, FAST_FAIL,
        ("the probe's 200, then a 200 from the closed breaker", lambda o: statuses(o) == [200, 200]),
        BULKHEAD_CHECK, RETRIES,
        ("the retry stats", lambda o: re.search(r'^breakwater_retries(_total)?\{[^}]*policy="inventory"', o, re.M)),
        STATS,
    ],
}


def readme_walkthrough():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        if "localhost:10000" in block and not block.lstrip().startswith("make"):
            return block
    sys.exit("README.md has no walk-through block")


def demo_walkthrough():
    return subprocess.run(["bash", os.path.join(ROOT, "tools/demo.sh"), "--commands"],
                          check=True, capture_output=True, text=True).stdout


def command_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def main():
    failures = 0
    for name in sys.argv[1:] or ["readme", "demo"]:
        lines = command_lines(readme_walkthrough() if name == "readme" else demo_walkthrough())
        expect = EXPECT[name]
        if len(lines) != len(expect):
            print(f"FAIL {name}: {len(lines)} commands but {len(expect)} expectations; update tools/walkthrough.py")
            failures += 1
            continue
        print(f"--- the {name} walk-through, pasted line by line")
        for line, (what, check) in zip(lines, expect):
            syntax = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
            if syntax.returncode != 0:
                print(f"FAIL does not paste as printed: {line}\n     {syntax.stderr.strip()}")
                failures += 1
                continue
            out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60).stdout
            out = out.replace("\r", "")
            ok = check(out)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} $ {line}\n     expected {what}" + ("" if ok else f"; got:\n{out}"))
    if failures:
        print(f"{failures} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
