#!/usr/bin/env bash
# The prepared GPU check: proves labkit's GPU path (CUDA tensors, NCCL, the GPU benchmarks) in one command, in
# under 8 minutes on one H100, with the machine's own python3 and torch: it installs nothing and needs no network.
#
# Usage (from anywhere; it checks the checkout it sits in):
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # on a machine with NVIDIA GPUs; default OUT_DIR: gpu_results/
#   bash benchmarks/gpu_check.sh --dry-run     # on any machine, no GPU needed: list the steps, run each command
#                                              # with --help appended (its flags, their types and choices), check
#                                              # the notebooks exist and that the steps cover every lab
#   bash benchmarks/gpu_check.sh OUT --only tour,bench_zero   # only these steps (to run a failed one again)
#   bash benchmarks/gpu_check.sh OUT --only notebook_09 --limit 300   # ... each under another time limit
# Environment: PYTHON (default python3), with labkit taken from this checkout (PYTHONPATH; an existing PYTHONPATH is
# kept after it, so wheels unpacked elsewhere, e.g. jupyter's for the notebook steps, can be added that way).
#
# Output: exactly two files in OUT_DIR: summary.txt (the machine, each step's result, time and limit, what was NOT
# TESTED and why, and the end of each step's log) and logs.tar.gz (every step's whole log).
# Exit status: 0 when every step that ran passed; 1 when any step failed or timed out (or torch does not import);
# 2 for a usage error, a machine without a CUDA GPU, or a dry run that found a problem.
#
# Time: every step runs under its own `timeout -k 2 LIMIT`. On one GPU the limits add up to 455 s, plus at most
# 2 s of kill grace per step (11 steps): 477 s, under 8 minutes even if every step hangs. With 2 GPUs or more,
# the multi-GPU steps add 580 s (2 GPUs), 60 s more with 4 and 90 s more with 8; on one GPU each prints
# "NOT TESTED on 1 GPU: ..." instead. Python packages labkit needs but this machine lacks (numpy, matplotlib,
# scikit-learn, cloudpickle, tqdm; jupyter for the notebooks) are named in the summary, and only the steps that
# need them are skipped (NOT TESTED, with the reason).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DRY=0
OUT=""
ONLY=""
LIMIT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs step names, e.g. --only tour,bench_zero" >&2; exit 2; }
            ONLY="$2"; shift ;;
    --limit) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --limit needs whole seconds, got '${2:-}'" >&2; exit 2; }
             LIMIT="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1; use --dry-run, --only STEPS, --help or an output folder" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one output folder, got '$OUT' and '$1'" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
OUT="${OUT:-gpu_results}"
if [ -n "$LIMIT" ] && [ -z "$ONLY" ]; then  # the whole check's 8 minutes rest on its own limits
  echo "gpu_check.sh: --limit goes with --only (e.g. --only notebook_09 --limit 300)" >&2; exit 2
fi

# ------------------------------------------------------------------------------------------------ Python snippets
# The machine: versions, the GPUs (torch and nvidia-smi), labkit's own Python packages present or missing.
read -r -d '' ENV_PY <<'PY'
import importlib.metadata, importlib.util, platform, shutil, subprocess, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA build "
      f"{torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"GPUs visible to torch: {n}")
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f"  GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
for name, dist in (("numpy", "numpy"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"),
                   ("cloudpickle", "cloudpickle"), ("tqdm", "tqdm"), ("threadpoolctl", "threadpoolctl"),
                   ("nbclient", "nbclient"), ("ipykernel", "ipykernel"), ("ipywidgets", "ipywidgets")):
    if importlib.util.find_spec(name) is None:  # found, not imported: jupyter's imports alone take seconds
        print(f"  {name} MISSING")
    else:
        try:
            print(f"  {name} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {name} present")
if "--dry" not in sys.argv and not n:
    sys.exit("no CUDA GPU visible to torch")
PY

# A notebook, executed top to bottom in a fresh kernel (nbclient); exit 77 = not tested (no jupyter here).
read -r -d '' NB_PY <<'PY'
import os, sys, time
path, limit = sys.argv[1], float(sys.argv[2])
if not os.path.exists(path):
    sys.exit(f"{path} does not exist")
missing = []
for name in ("nbformat", "nbclient", "ipykernel", "ipywidgets", "IPython"):
    try:
        __import__(name)
    except Exception:
        missing.append(name)
if missing:
    print(f"NOT TESTED: jupyter is not installed for {sys.executable} (missing: {', '.join(missing)}); carry "
          f"their wheels (see benchmarks/README.md) to run {os.path.basename(path)} here")
    sys.exit(77)
if "--dry" in sys.argv:
    sys.exit(0)
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(path, as_version=4)
t0 = time.perf_counter()
NotebookClient(nb, timeout=int(limit), kernel_name="python3",
               resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
for cell in nb.cells:  # what the cells printed: the figures a GPU changes
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            print(out.get("text", ""), end="")
print(f"\n{os.path.basename(path)} ran top to bottom in {time.perf_counter() - t0:.0f} s")
PY

# Lab 08's workers on this machine: a CPU trial is not capped at the GPU count; GPU trials get the visible list.
read -r -d '' ABLATION_PY <<'PY'
import os, sys
from labkit.ablation.runner import _gpus, default_workers, gpu_slots
if "--dry" in sys.argv:
    sys.exit(0)
cores = max(1, min(4, len(os.sched_getaffinity(0))))
print(f"GPUs {_gpus()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}: CPU trials get "
      f"{default_workers()} worker(s) (cores, at most 4: {cores}); GPU trials {default_workers(gpu=True)}, seeing "
      f"{gpu_slots(_gpus())}")
assert default_workers() == cores, "a CPU trial's workers are capped by the GPUs"
assert len(gpu_slots(_gpus())) == _gpus()
PY

# Lab 02's nn.DataParallel on 2 GPUs: the legacy single-process data parallelism the course corrects.
read -r -d '' DP_PY <<'PY'
import sys
from labkit.ddp.lab import data_parallel_demo
if "--dry" in sys.argv:
    sys.exit(0)
out = data_parallel_demo()
print(out)
assert out["gpus"] >= 2 and out["same_as_module"], out
PY

# ------------------------------------------------------------------------------------------------ the steps
# add_step NAME LIMIT_S MIN_GPUS "NEEDS" "WHAT IT VERIFIES" -- COMMAND...
# NEEDS: the Python modules the step cannot run without (skipped, NOT TESTED, when one is missing).
NAMES=(); LIMITS=(); GPUS=(); NEEDS=(); WHAT=(); CMDS=()
add_step() {
  local name=$1 limit=$2 gpus=$3 needs=$4 what=$5
  shift 6  # the five fields and "--"
  NAMES+=("$name"); LIMITS+=("$limit"); GPUS+=("$gpus"); NEEDS+=("$needs"); WHAT+=("$what")
  CMDS+=("$(printf '%q ' "$@")")
}
LABKIT=("$PY" -m labkit)
ALL="numpy matplotlib sklearn cloudpickle tqdm"
# One GPU: limits 10 + 35 + 120 + 80 + 45 + 30 + 25 + 30 + 45 + 10 + 25 = 455 s.
add_step env 10 0 "" "the GPUs, torch, CUDA and NCCL versions, which of labkit's packages are here" \
  -- "$PY" -c "$ENV_PY"
add_step doctor 35 1 "cloudpickle" "the doctor: gloo on 2 ranks and NCCL on 1 rank, NCCL required where auto picks it" \
  -- "${LABKIT[@]}" doctor
add_step tour 120 1 "$ALL" "every lab's rank functions on 1-rank NCCL (refused unless auto picks NCCL)" \
  -- "${LABKIT[@]}" tour -n 1 --require-backend nccl
add_step bench_hardware 80 1 "numpy cloudpickle" \
  "lab 09 on the GPU, each experiment guarded: calculator vs the CUDA allocator; fp32, TF32, bf16, fp16+GradScaler; channels_last; batch; checkpointing; pinned memory + cudnn.benchmark; torch.compile last" \
  -- "${LABKIT[@]}" bench hardware --device cuda --quick --model resnet18 --batch 64 --trials 3 \
     --only memory,precision,channels_last,batch,checkpoint,input,compile
add_step bench_kmeans 45 1 "numpy sklearn cloudpickle" "lab 06: k-means on 1,000,000 x 64 (k = 64) on the GPU vs scikit-learn on every core" \
  -- "${LABKIT[@]}" bench kmeans --gpu --repeats 1 --max-iter 50 --no-distributed
add_step bench_zero 30 1 "numpy cloudpickle" "lab 10 on 1-rank NCCL: every method's tensors on the GPU, memory from the CUDA allocator, the backend read from the results" \
  -- "${LABKIT[@]}" bench zero --world-sizes 1 --quick --no-prefetch
add_step bench_ddp 25 1 "numpy sklearn cloudpickle" "lab 02 on 1-rank NCCL: the four DDPs with data and model on the GPU, the backend column" \
  -- "${LABKIT[@]}" bench ddp --ranks 1 --quick
add_step bench_capstone 30 1 "numpy cloudpickle" "lab 11 on 1-rank NCCL: the 1x1x1 grid against one process" \
  -- "${LABKIT[@]}" bench capstone --grid 1x1x1 --rounds 1 --steps 2
# Lab 12: with one GPU, its 1-rank launch is NCCL on CUDA (one process's attention and MoE, the 1-rank ring, the
# memory at cp = 1) and its 2- and 4-rank launches gloo on the CPU (NCCL needs a GPU per rank); --torch-cp runs
# torch's context_parallel on a DeviceMesh of every GPU (1 here) against labkit's ring, each SDPA kernel guarded.
add_step bench_context_expert 45 1 "numpy cloudpickle" "lab 12 quick on 1-rank NCCL (CUDA) and 2/4-rank gloo: ring attention, memory per rank and expert parallelism beside their formulas; torch's context_parallel (flash, efficient, cuDNN SDPA) against labkit's ring" \
  -- "${LABKIT[@]}" bench context_expert --quick --torch-cp
add_step ablation_workers 10 1 "numpy" "lab 08: CPU trials not capped at the GPU count; GPU trials see the visible list" \
  -- "$PY" -c "$ABLATION_PY"
# Notebook 09 needs 90-110 s on one GPU (benchmarks/README.md), more than the 8 minutes leave: with jupyter present it
# times out here, to be run apart (--only notebook_09 --limit 300); its 25 s show the kernel starts and runs cells.
add_step notebook_09 25 1 "$ALL" "notebook 09 top to bottom with its speed experiments on cuda" \
  -- "$PY" -c "$NB_PY" notebooks/09_hardware.ipynb 25
# Two GPUs or more: 150 + 60 + 40 + 60 + 90 + 30 + 90 + 60 = 580 s; four: + 60 s; eight: + 90 s.
add_step tour_2ranks 150 2 "$ALL" "every lab's rank functions on 2-rank NCCL" \
  -- "${LABKIT[@]}" tour -n 2 --require-backend nccl
add_step bench_zero_2ranks 60 2 "numpy cloudpickle" "ZeRO-1/2/3, torch's ZeRO and FSDP2 on 2-rank NCCL; ZeRO-3 with prefetch against none" \
  -- "${LABKIT[@]}" bench zero --quick
add_step bench_ddp_2ranks 40 2 "numpy sklearn cloudpickle" "the four DDPs on 2-rank NCCL" \
  -- "${LABKIT[@]}" bench ddp --ranks 2 --quick
add_step bench_collectives_2ranks 60 2 "numpy cloudpickle" "hand-written all-reduces and the ping-pong fit on 2-rank NCCL" \
  -- "${LABKIT[@]}" bench collectives --quick -n 2 --backend nccl
add_step bench_kmeans_nccl 90 2 "numpy sklearn cloudpickle" "distributed Lloyd on 2 NCCL ranks beside one GPU process" \
  -- "${LABKIT[@]}" bench kmeans --device cuda --quick
add_step data_parallel 30 2 "numpy sklearn" "nn.DataParallel on 2 GPUs (lab 02)" \
  -- "$PY" -c "$DP_PY"
add_step notebook_06 90 2 "$ALL" "notebook 06 with its 2-rank launches on NCCL" \
  -- "$PY" -c "$NB_PY" notebooks/06_kmeans_pseudo_labels.ipynb 90
add_step bench_capstone_grids 60 2 "numpy cloudpickle" "the 2x1x1, 1x2x1 and 1x1x2 grids on NCCL against one process" \
  -- "${LABKIT[@]}" bench capstone --grid 2x1x1 --grid 1x2x1 --grid 1x1x2 --rounds 1 --steps 2
add_step bench_collectives_4ranks 60 4 "numpy cloudpickle" "the collectives on 4-rank NCCL" \
  -- "${LABKIT[@]}" bench collectives --quick -n 4 --backend nccl
add_step bench_capstone_2x2x2 90 8 "numpy cloudpickle" "the 2x2x2 grid on 8-rank NCCL" \
  -- "${LABKIT[@]}" bench capstone --grid 2x2x2 --rounds 1 --steps 2
# What a check on fewer GPUs cannot show, beyond the steps above: launches whose rank count is fixed by the lab.
FIXED_SIZE_NOTE="lab 11's tour launches a fixed number of ranks (the 2x2x2 grid on 8; the 1x1x2 grid and torch's tensor-parallel block on 2): with fewer GPUs than ranks those run on gloo"

for name in ${ONLY//,/ }; do
  [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "gpu_check.sh: --only: no step '$name'; steps: ${NAMES[*]}" >&2; exit 2; }
done

# ------------------------------------------------------------------------------------------------ helpers
missing_modules() {  # the modules among "$1" that this python cannot import
  "$PY" - $1 <<'PY' 2>/dev/null
import importlib.util, sys
def missing(m):
    try:
        return importlib.util.find_spec(m) is None
    except Exception:  # a broken install: as good as missing
        return True
print(" ".join(m for m in sys.argv[1:] if missing(m)))
PY
}

# The dry run, in one Python process (one torch import): reads the steps (name, limit, GPUs, argc, argv...: NUL-
# separated) on stdin; for each, the labs it covers (labkit.tour.LABS: the tour's selection, a bench's lab, a
# notebook's lab), then its command with --help appended through labkit's own command line (argparse checks the
# type and choices of every option before it, then prints the help; each option must appear in that help), or a
# snippet run with --dry (its imports, its notebook); and that the notebooks exist. Exit 2 on any problem.
read -r -d '' DRY_PY <<'PY'
import contextlib, io, os, sys
from labkit.__main__ import main as labkit_main
from labkit.tour import LABS, select

fields = sys.stdin.buffer.read().decode().split("\0")[:-1]
steps = []
while fields:
    name, limit, gpus, argc = fields[:4]
    steps.append((name, int(limit), int(gpus), fields[4:4 + int(argc)]))
    fields = fields[4 + int(argc):]


def covers(argv):
    got = []
    if argv[1:3] == ["-m", "labkit"] and argv[3] == "tour":
        filters, skip = [], False
        for a in argv[4:]:
            if skip:
                skip = False
            elif a in ("-n", "--world-size", "--require-backend"):
                skip = True
            elif not a.startswith("-"):
                filters.append(a)
        got = [lab.number for lab in select(filters or None)]
    elif argv[1:3] == ["-m", "labkit"] and argv[3] == "bench":
        got = [lab.number for lab in LABS if lab.bench == argv[4]]
    got += [lab.number for a in argv if a.endswith(".ipynb") for lab in LABS if lab.notebook == os.path.basename(a)]
    return sorted(set(got))


def quietly(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = fn(*args)
        except SystemExit as e:
            code = e.code
    return (0 if code is None else code), out.getvalue()


problems, covered, one_gpu = [], set(), 0
for name, limit, gpus, argv in steps:
    labs = covers(argv)
    if gpus <= 1:
        covered.update(labs)
        one_gpu += limit + 2  # the kill grace of `timeout -k 2`
    snippet = argv[1] == "-c"
    shown = " ".join([argv[0], "-c", f"<{name} snippet>", *argv[3:]] if snippet else argv)
    print(f"step {name:<24} limit {limit:>4} s  GPUs >= {gpus}  labs: {' '.join(labs) or '-':<12} {shown}")
    bad = []
    if snippet:
        def run(code=argv[2], args=argv[3:]):
            sys.argv = ["-c", *args, "--dry"]
            exec(compile(code, f"<{name} snippet>", "exec"), {"__name__": "__main__"})
        code, out = quietly(run)
        if code not in (0, 77):
            bad.append(f"its snippet fails with --dry (exit {code}): {out.strip().splitlines()[-3:]}")
        elif code == 77:
            print(f"  note: {out.strip().splitlines()[-1][:150]}")
    else:
        code, out = quietly(labkit_main, argv[3:] + ["--help"])
        if code != 0:
            bad.append(f"'{' '.join(argv[3:])} --help' exits {code}: {out.strip().splitlines()[-2:]}")
        else:
            bad += [f"its --help does not know {a}" for a in argv if a.startswith("--") and a.split("=")[0] not in out]
    bad += [f"{a} does not exist" for a in argv if a.endswith(".ipynb") and not os.path.exists(a)]
    for b in bad:
        print(f"  PROBLEM: {b}")
    problems += bad
    if not bad:
        print("  ok")
print(f"limits on one GPU, with the kill grace: {one_gpu} s (must stay under 480 s); all steps: "
      f"{sum(s[1] for s in steps)} s")
if one_gpu >= 480:
    problems.append(f"the one-GPU steps could take {one_gpu} s, over 8 minutes")
    print(f"  PROBLEM: {problems[-1]}")
print(f"labs covered on one GPU: {' '.join(sorted(covered))}")
missing = [lab.name for lab in LABS if lab.number not in covered]
if missing:
    problems.append(f"no one-GPU step covers {missing}")
    print(f"  PROBLEM: {problems[-1]}")
print(f"dry run: {len(problems)} problem(s)" if problems else f"dry run: ok ({len(steps)} steps)")
sys.exit(2 if problems else 0)
PY

# ------------------------------------------------------------------------------------------------ dry run
if [ "$DRY" = 1 ]; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "dry run: $PY cannot import torch; set PYTHON to an interpreter with torch" >&2
    exit 2
  fi
  m="$(missing_modules "$ALL nbclient ipykernel ipywidgets")"
  echo "gpu_check.sh --dry-run with $PY; Python packages missing there: ${m:-none}"
  for i in "${!NAMES[@]}"; do
    eval "argv=(${CMDS[$i]})"
    printf '%s\0' "${NAMES[$i]}" "${LIMITS[$i]}" "${GPUS[$i]}" "${#argv[@]}" "${argv[@]}"
  done | "$PY" -c "$DRY_PY"
  exit $?
fi

# ------------------------------------------------------------------------------------------------ the run
mkdir -p "$OUT" || exit 2
SUMMARY="$OUT/summary.txt"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/labkit-gpu-check.XXXXXX")" || exit 2
archive() { tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; rm -rf "$LOGS"; }
trap archive EXIT
T0=$(date +%s)
if ! torch_line=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>"$LOGS/torch_import.log"); then
  { echo "labkit GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"; echo "FAILED: $PY cannot import torch:"; tail -n 5 "$LOGS/torch_import.log"; } | tee "$SUMMARY"
  exit 1
fi
read -r TORCH CUDA NGPU <<<"$torch_line"
# For this script's own tests on a CPU only (tests/test_gpu_check.py): pretend to this many GPUs.
NGPU="${LABKIT_GPU_CHECK_PRETEND_GPUS:-$NGPU}"
if [ "$NGPU" = 0 ]; then
  { echo "labkit GPU check: torch $TORCH (CUDA build $CUDA) sees no CUDA GPU here; run it on a GPU machine, or"
    echo "bash benchmarks/gpu_check.sh --dry-run to check the script itself"; } | tee "$SUMMARY" >&2
  exit 2
fi
MISSING="$(missing_modules "$ALL")"
{
  echo "labkit GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'), host $(hostname)"
  echo "torch $TORCH (CUDA $CUDA), $NGPU GPU(s): $("$PY" -c 'import torch; print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))' 2>/dev/null)"
  echo "labkit's Python packages missing here: ${MISSING:-none}"
  echo
} > "$SUMMARY"
cat "$SUMMARY"
passed=(); failed=(); untested=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} limit=${LIMIT:-${LIMITS[$i]}}
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$name,"* ]] || continue
  eval "argv=(${CMDS[$i]})"
  if [ "$NGPU" -lt "${GPUS[$i]}" ]; then
    untested+=("NOT TESTED on $NGPU GPU$([ "$NGPU" = 1 ] || echo s): $name (needs ${GPUS[$i]} GPUs): ${WHAT[$i]}")
    continue
  fi
  lacking=""
  for m in ${NEEDS[$i]}; do [[ " $MISSING " == *" $m "* ]] && lacking="$lacking $m"; done
  if [ -n "$lacking" ]; then
    untested+=("NOT TESTED: $name: Python package(s) missing here:$lacking")
    continue
  fi
  printf '== %-24s (limit %s s) %s\n' "$name" "$limit" "${WHAT[$i]}"
  s=$(date +%s)
  timeout -k 2 "$limit" "${argv[@]}" > "$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - s ))
  case "$rc" in
    0) result="ok"; passed+=("$name") ;;
    77) result="NOT TESTED"; untested+=("NOT TESTED: $name: $(tail -n 1 "$LOGS/$name.log")") ;;
    124|137) result="FAILED (timed out at $limit s)"; failed+=("$name") ;;
    *) result="FAILED (exit $rc)"; failed+=("$name") ;;
  esac
  printf '   %s, %s s\n' "$result" "$secs"
  { printf '== %s: %s, %s s of %s s: %s\n' "$name" "$result" "$secs" "$limit" "${WHAT[$i]}"
    [ "${argv[1]}" = "-c" ] && echo "   \$ $PY -c <$name snippet: see benchmarks/gpu_check.sh> ${argv[*]:3}" || echo "   \$ ${argv[*]}"
    tail -n 30 "$LOGS/$name.log" | sed 's/^/   | /'
    echo; } >> "$SUMMARY"
done
[ -z "$ONLY" ] && [ "$NGPU" -lt 8 ] && untested+=("NOT TESTED on $NGPU GPU$([ "$NGPU" = 1 ] || echo s): $FIXED_SIZE_NOTE")
{
  for u in "${untested[@]}"; do echo "$u"; done
  echo
  echo "result: ${#passed[@]} passed, ${#failed[@]} FAILED${failed:+ (${failed[*]})}, ${#untested[@]} not tested; $(( $(date +%s) - T0 )) s in all"
  echo "logs: $OUT/logs.tar.gz"
} >> "$SUMMARY"
for u in "${untested[@]}"; do echo "$u"; done
tail -n 2 "$SUMMARY"
[ "${#failed[@]}" = 0 ]
