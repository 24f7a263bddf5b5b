"""One-factor-at-a-time table of labkit.ablation.training: mean +- sd test accuracy over seeds.

    PYTHONPATH=. python benchmarks/ablation_ofat.py [SEEDS]
"""
import statistics
import sys
import time

import torch

from labkit.ablation import training as tr
from labkit.ablation.factors import FACTORS

torch.set_num_threads(1)
if len(sys.argv) > 2:  # baseline overrides as JSON, e.g. '{"lr": 0.01}'; then only the listed factors
    import json

    tr.BASELINE.update(json.loads(sys.argv[2]))
ONLY = sys.argv[3].split(",") if len(sys.argv) > 3 else list(FACTORS)
seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
s = tr.digits_split()
xp, yp = tr.pseudo_labels()
yu = s["U"][1]
print(f"pseudo-labels kept {len(yp)}/{len(yu)}")
print(f"teacher test accuracy {tr._evaluate(tr.teacher(), *s['test'])[0]:.3f}")


def row(name, config):
    t = time.perf_counter()
    res = [tr.run_trial(config, seed) for seed in seeds]
    accs = [r["accuracy"] for r in res]
    base = BASE if BASE else accs
    diffs = [a - b for a, b in zip(accs, base)]
    print(f"{name:28s} {statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f}   "
          f"paired diff {statistics.mean(diffs):+.3f} +- {statistics.stdev(diffs) if BASE else 0:.3f}   "
          f"{(time.perf_counter() - t) / len(res):.2f} s/trial")
    return accs


BASE = None
BASE = row("baseline", {})
for name, f in FACTORS.items():
    if name not in ONLY:
        continue
    for v in f.values:
        if v != tr.BASELINE[name]:
            row(f"{name}={v}", {name: v})
