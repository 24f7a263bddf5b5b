"""Paired kernel check: the same tiny cells alternate between a kernel on the installed ipykernel and one on another
ipykernel installed into a folder, under busy processes; prints the stalls and cell times of each.

    pip install --no-deps --target /tmp/ipk6 "ipykernel==6.29.5" nest_asyncio
    python benchmarks/kernel_ab.py 3000 2 60 /tmp/ipk6      # cells, busy processes, seconds before a stall, folder
    python benchmarks/kernel_ab.py 1500 1 60 /tmp/ipk6 widgets   # Output-widget cells (clear_output, a plot)

Issue 11's figures (3000 cells each, 2 busy processes, load average 17-20): 0 stalls on either; median 286 ms
(7.4.0) and 280 ms (6.29.5) per cell; max 54 s and 45 s. Issue 9's, with ``widgets`` (the cell shape nbclient
stalled on in a CI-like run; 1500 cells each, 1 busy process beside a full test run): 0 stalls on either; median
315 ms and 314 ms, max 0.8 s. This client (labkit.runtime.stress.Session) sends no comm messages back, as nbclient
does for Output widgets: the stall did not come back without nbclient.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

from labkit.runtime.busy import BusyLoad
from labkit.runtime.stress import Session

n, busy, timeout, other = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cells = ["x = 1", "print('hello')", "import ipywidgets as w; w.IntSlider()", "import sys; sys.stderr.write('e\\n')"]
SETUP = ("%matplotlib inline\nimport ipywidgets as w\nimport matplotlib.pyplot as plt\n"
         "from IPython.display import display\n"
         "out = w.Output()\ndef draw(k):\n"
         "    fig, ax = plt.subplots(figsize=(3, 2)); ax.bar([0, 1], [k, 2]); plt.show()\n"
         "def on(change=None):\n    with out:\n        out.clear_output(wait=True)\n        draw(1)\n")
if len(sys.argv) > 5 and sys.argv[5] == "widgets":
    cells = ["on()\ndisplay(out)", "on()", "with out:\n    print('x')", "x = 1"]
env6 = dict(os.environ, PYTHONPATH=other)
with BusyLoad(busy), tempfile.TemporaryDirectory() as tmp:
    S = {"installed": Session(Path(tmp), Path(tmp) / "s7.txt"),
         "other": Session(Path(tmp), Path(tmp) / "s6.txt", env=env6)}
    for k, s in S.items():
        print(k, s.run("import ipykernel; print(ipykernel.__version__)", 60)["text"].strip(), flush=True)
        if len(sys.argv) > 5 and sys.argv[5] == "widgets":
            s.run(SETUP, 120)
    stats = {k: {"stall": 0, "runs": 0, "times": []} for k in S}
    t0 = time.monotonic()
    for i in range(n):
        for k, s in S.items():
            if stats[k]["stall"] >= 3:
                continue
            r = s.run(cells[i % len(cells)], timeout=timeout)
            stats[k]["runs"] += 1
            stats[k]["times"].append(r["seconds"])
            if r["state"] != "ok":
                stats[k]["stall"] += 1
                print(f"ipykernel {k}: cell {i}: {r['state']}: {r['detail'][:200]}", flush=True)
        if i % 250 == 0:
            print(i, f"{time.monotonic() - t0:.0f} s", {k: (v["runs"], v["stall"]) for k, v in stats.items()},
                  flush=True)
    for s in S.values():
        s.close()
for k, v in stats.items():
    t = sorted(v["times"])
    print(f"ipykernel {k}: {v['runs']} cells, {v['stall']} stalls, median {t[len(t)//2]*1e3:.0f} ms, max {t[-1]:.1f} s")
