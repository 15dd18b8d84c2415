#!/usr/bin/env python3
"""Who imports whom among kiln's top-level modules (src/<module>/ or src/<module>.rs), read from
`crate::<module>` paths in the source, and the `#[cfg(feature = "cuda")]` gates outside
src/backend. Prints one line per module with the modules it uses, then the counts.

    tools/modgraph.py            # the graph of the working tree
"""
import os, re, sys
from collections import defaultdict

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
mods = sorted({n[:-3] if n.endswith(".rs") else n for n in os.listdir(root)} - {"lib", "main"})
uses = defaultdict(set)
gates = defaultdict(int)
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)
        me = rel.split(os.sep)[0]
        me = me[:-3] if me.endswith(".rs") else me
        text = open(path).read()
        # `use crate::{a, b::c}` groups and plain `crate::x` paths
        for m in re.finditer(r"crate::\{([^}]*)\}", text):
            for part in m.group(1).split(","):
                name = part.strip().split("::")[0]
                if name in mods and name != me:
                    uses[me].add(name)
        for m in re.finditer(r"crate::(\w+)", text):
            if m.group(1) in mods and m.group(1) != me:
                uses[me].add(m.group(1))
        if not rel.startswith("backend"):
            gates[rel] += len(re.findall(r'#\[cfg\(feature = "cuda"\)\]', text))
for m in mods:
    print(f"{m:10} -> {', '.join(sorted(uses[m])) or '-'}")
back = [(a, b) for a in mods for b in uses[a] if a in uses[b]]
print(f"\nedges: {sum(len(v) for v in uses.values())}; cycles (pairs importing each other): "
      + (", ".join(f"{a}<->{b}" for a, b in back if a < b) or "none"))
print(f'#[cfg(feature = "cuda")] outside src/backend: {sum(gates.values())} '
      + "(" + ", ".join(f"{k} {v}" for k, v in sorted(gates.items(), key=lambda kv: -kv[1]) if v) + ")")
