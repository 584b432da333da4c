#!/usr/bin/python3
"""The module graph of daemon/ runs one way: every file includes only headers of modules in a
lower layer (and its own header). Fails on a cycle or on an include the layering forbids.

    tests/layering.py [DAEMON_DIR]        prints "N passed, N failed" (one check per file)

The layers, lowest first (README, "Design notes", says the same):
"""
import re
import sys
from pathlib import Path

LAYERS = [
    ("base", ["log", "stats", "hmap", "route", "conftree", "heap", "wake"]),
    ("messages", ["pdu"]),
    ("configuration", ["keys", "pki", "config"]),
    ("transports", ["loop", "discovery", "mqtt", "exchange", "notify"]),
    ("state", ["journal", "device", "oscore"]),
    ("bridge", ["uplink", "observe", "command"]),
    ("reporting", ["metrics"]),
    ("wiring", ["main"]),
]
# within "configuration", config.h builds on keys.h and pki.h, pki.h on keys.h
SAME_LAYER = {("config", "keys"), ("config", "pki"), ("pki", "keys")}
__doc__ += "\n".join(f"    {i}. {name}: {', '.join(mods)}" for i, (name, mods) in enumerate(LAYERS))

RANK = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)\.h"', re.M)


def includes(path):
    return INCLUDE.findall(path.read_text(encoding="utf-8"))


def main(daemon):
    files = sorted(list(daemon.glob("*.c")) + list(daemon.glob("*.h")))
    graph, passed, failed = {}, 0, 0
    for f in files:
        mod = f.stem
        bad = []
        if mod not in RANK:
            bad.append(f"module {mod} is in no layer of tests/layering.py")
        for inc in includes(f):
            graph.setdefault(mod, set()).add(inc)
            if inc == mod or (mod, inc) in SAME_LAYER:
                continue
            if inc not in RANK:
                bad.append(f"includes {inc}.h, which is in no layer")
            elif mod in RANK and RANK[inc] >= RANK[mod]:
                bad.append(f"includes {inc}.h: layer {LAYERS[RANK[inc]][0]} is not below "
                           f"{LAYERS[RANK[mod]][0]}")
        if bad:
            failed += 1
            for b in bad:
                print(f"FAIL {f.name}: {b}")
        else:
            passed += 1
    # a cycle between modules (through .c or .h files) is a failure of its own
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            return stack[stack.index(m):] + [m]
        if m in seen:
            return None
        seen.add(m)
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n != m and (m, n) not in SAME_LAYER:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        return None
    for m in sorted(graph):
        cycle = visit(m)
        if cycle:
            print("FAIL cycle: " + " -> ".join(cycle))
            failed += 1
            break
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else
                       Path(__file__).resolve().parents[1] / "daemon")))
