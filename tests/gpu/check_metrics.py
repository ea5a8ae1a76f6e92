#!/usr/bin/env python3
"""check_metrics.py: compares the per-step losses of two runs' metrics.jsonl (tests/gpu/pipeline.sh).

  check_metrics.py A/metrics.jsonl B/metrics.jsonl --exact          every (stage, step) loss identical
  check_metrics.py A/metrics.jsonl B/metrics.jsonl --rel 0.03       |a - b| <= rel * max(|b|, 0.1) per step
  ... --stages layerwise,distill                                      only the rows of these stages (a name also
                                                                     takes its stepwise parts: layerwise-1, -2, ...)
  ... --steps 1                                                      only steps <= 1 of each stage

Rows are keyed by (stage, step); when a step appears more than once (a resumed run repeats nothing, but a
stage restarted from a checkpoint re-writes the steps after it), the last row wins. Both files must hold the
same keys. Prints the worst difference per stage; exit status 1 on any failure.
"""
import json
import sys


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if "event" in r or "loss" not in r:
                continue
            rows[(r["stage"], r["step"])] = r["loss"]
    return rows


def main():
    a_path, b_path = sys.argv[1], sys.argv[2]
    exact = "--exact" in sys.argv
    rel = float(sys.argv[sys.argv.index("--rel") + 1]) if "--rel" in sys.argv else 0.0
    a, b = load(a_path), load(b_path)
    if "--stages" in sys.argv:
        keep = set(sys.argv[sys.argv.index("--stages") + 1].split(","))

        def kept(stage):
            base, _, part = stage.rpartition("-")
            return stage in keep or (part.isdigit() and base in keep)

        a = {k: v for k, v in a.items() if kept(k[0])}
        b = {k: v for k, v in b.items() if kept(k[0])}
        if not a or not b:
            print(f"FAIL no rows of stages {sorted(keep)} in {a_path if not a else b_path}")
            return 1
    if "--steps" in sys.argv:
        last = int(sys.argv[sys.argv.index("--steps") + 1])
        a = {k: v for k, v in a.items() if k[1] <= last}
        b = {k: v for k, v in b.items() if k[1] <= last}
    fail = 0
    if set(a) != set(b):
        print(f"FAIL steps differ: only in A {sorted(set(a) - set(b))[:6]}, only in B {sorted(set(b) - set(a))[:6]}")
        fail = 1
    worst = {}
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x is None or y is None:
            d = 0.0 if x == y else float("inf")
        else:
            d = abs(x - y) / max(abs(y), 0.1)
        s = k[0]
        if d > worst.get(s, (-1, None))[0]:
            worst[s] = (d, k[1], x, y)
        if (exact and x != y) or (not exact and not d <= rel):
            fail = 1
    for s, (d, step, x, y) in worst.items():
        print(f"  {s:12s} worst rel diff {d:.3e} at step {step}: {x!r} vs {y!r}")
    n = len(set(a) & set(b))
    mode = "identical" if exact else f"within {rel:g}"
    print(("FAIL" if fail else "ok  ") + f" {n} steps {mode}: {a_path} vs {b_path}")
    return fail


if __name__ == "__main__":
    sys.exit(main())
