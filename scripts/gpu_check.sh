#!/usr/bin/env bash
# The first GPU's one command: the GPU tests, `bench kernels`, a short run with --kernels=triton
# and with --kernels=torch through the newer paths (--aug=finetune, --distill=state0,
# --round_to=8; their accuracies compared), `export` of that run's pruned state (loaded back and
# compared), `bench train` (dense, pruned and the compacted twin, their MFU; with and without
# torch.compile) and `bench export` (dense, pruned and its widths rounded to 8, 32, 64; eager and
# torch.compile).
#
#   scripts/gpu_check.sh OUT          on a CUDA machine: vit_small, bf16, batch 512 (a budget of 8 min)
#   scripts/gpu_check.sh --cpu OUT    dry run on the CPU: the same steps with tiny shapes (< 3 min)
#
# OUT gets report.md (device, every table, the time of every step) and one raw log per step:
# at most 8 files. Needs torch, triton, timm and pytest; not fire or wandb (the Python entry
# points are called directly, W&B is off) and no network. Exit status 1 if any step failed.
# It runs this checkout's code whether or not a vitprune is installed, and writes nothing into
# the checkout: `git status --porcelain --ignored` is the same before and after.
set -u
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
[ $# -eq 1 ] || { echo "usage: scripts/gpu_check.sh [--cpu] OUT" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$(command -v python3 || command -v python)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=$tmp/runs  # run folders (checkpoints): large, not part of the report
mkdir "$runs" "$tmp/vitprune"
# The package as setup.py installs it (kernels/ as vitprune.kernels), built of links in $tmp:
# the steps run there, with $tmp first on the path, so `import vitprune` finds it before any
# installed vitprune and before the checkout's own folder (which has no kernels). No bytecode
# is written (it would land in the linked folders) and pytest runs without its cache.
for entry in "$repo"/vitprune/*; do
    case ${entry##*/} in __pycache__|kernels) ;; *) ln -s "$entry" "$tmp/vitprune/" ;; esac
done
ln -s "$repo/kernels" "$tmp/vitprune/kernels"
cd "$tmp"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$tmp${PYTHONPATH:+:$PYTHONPATH}"
report=$out/report.md
start=$(date +%s)
# Seconds for all steps (GPU_CHECK_BUDGET overrides): a step gets at most what is left, so on
# a GPU the check ends within 8 minutes whatever a step costs; on the CPU it only stops a runaway.
budget=${GPU_CHECK_BUDGET:-$(( cpu ? 600 : 480 ))}
failed=0

if [ $cpu = 1 ]; then
    device=cpu
    kernels_args="batches=(1,), alive=(1.0, 0.3), device='cpu', iters=1, small=True"
    train_args="model='vit_micro', batch=8, iters=2, device='cpu'"
    run_flags="model='vit_micro', device='cpu'"
    triton_leg=auto  # the interpreter would take hours: auto shows which backend a CPU run records
    export_args="model='vit_micro', batches=(1, 8), iters=2, device='cpu', onnxruntime=False, compile=False"
    # The plumbing, not the accuracy: a small synthetic set (576 images, 10% val; 128 test).
    prelude="import vitprune.data.synth as synth; synth.SYNTHETIC_SIZES = (512, 64, 128)
"
else
    device=cuda
    kernels_args="batches=(512,), dtype='bfloat16'"
    train_args="model='vit_small', batch=512, precision='bf16'"
    run_flags="model='vit_small'"
    triton_leg=triton
    # BENCHMARKS.md's rounding rows on the GPU (ONNX Runtime is a CPU bench): one batch, as
    # torch.compile builds each of the five models once per batch size.
    export_args="model='vit_small', batches=(256,), dtype='bfloat16', onnxruntime=False"
    prelude=""
fi

# step NAME CAP_SECONDS LOG COMMAND...: run it with what is left of the budget (at most CAP),
# its output in OUT/LOG, its time and status in the report and on the console.
step() {
    local name=$1 cap=$2 file=$3 log=$out/$3; shift 3
    local left=$(( budget - ($(date +%s) - start) ))
    local limit=$(( cap < left ? cap : left )) t0=$(date +%s) rc
    if [ $limit -lt 5 ]; then
        rc=skipped
        echo "skipped: out of time" >> "$log"
    else
        echo "\$ $*" >> "$log"
        # In a shell of its own (the steps are functions); timeout ends its whole process group.
        timeout "$limit" bash -c '"$@"' step "$@" >> "$log" 2>&1
        rc=$?
        [ $rc = 124 ] && echo "stopped after ${limit} s (time budget)" >> "$log"
    fi
    local secs=$(( $(date +%s) - t0 ))
    [ "$rc" = 0 ] || failed=1
    printf '%-34s %4d s  %s\n' "$name" "$secs" "$([ "$rc" = 0 ] && echo ok || echo "FAILED ($rc, see $file)")"
    printf '| %s | %d | %s |\n' "$name" "$secs" "$([ "$rc" = 0 ] && echo ok || echo "FAILED ($rc)")" >> "$out/steps.tmp"
}

vp() { "$py" -c "$prelude$1"; }  # a vitprune call, without Fire

info() {
    vp "
import platform, torch, triton, timm, numpy
print('python', platform.python_version(), '| torch', torch.__version__, '| triton', triton.__version__,
      '| timm', timm.__version__, '| numpy', numpy.__version__)
for m in ('fire', 'wandb'):
    try: __import__(m); print(m, 'installed')
    except ImportError: print(m, 'not installed (not needed here)')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'cuda:0 {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}')
else:
    print('no CUDA device')
"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "CPU cores: $(nproc)"
}

# The GPU tests in parallel shards (one process each): compiling the Triton kernels' variants
# is CPU work, and one process would compile them one after another.
gpu_tests() {
    local ids shards i pids=() rc=0
    "$py" -m pytest -q -p no:cacheprovider --rootdir "$repo" --co -m gpu "$repo/tests" > "$runs/collect.log" 2>&1 ||
        { cat "$runs/collect.log"; return 1; }
    mapfile -t ids < <(grep '::' "$runs/collect.log")
    [ ${#ids[@]} -gt 0 ] || { echo "no gpu tests collected"; return 1; }
    ids=("${ids[@]/#/$repo/}")  # test ids are relative to the checkout, and the steps run in $tmp
    shards=$(( $(nproc) < 8 ? $(nproc) : 8 ))
    for ((i = 0; i < shards; i++)); do
        local mine=()
        for ((j = i; j < ${#ids[@]}; j += shards)); do mine+=("${ids[j]}"); done
        [ ${#mine[@]} -gt 0 ] || continue
        "$py" -m pytest -q -p no:cacheprovider --rootdir "$repo" "${mine[@]}" > "$runs/shard$i.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    cat "$runs"/shard*.log
    echo "${#ids[@]} gpu tests in ${#pids[@]} shards: $(grep -ho '[0-9]* passed' "$runs"/shard*.log |
        awk '{s += $1} END {print s + 0}') passed, $(grep -ho '[0-9]* skipped' "$runs"/shard*.log |
        awk '{s += $1} END {print s + 0}') skipped, $(grep -ho '[0-9]* failed' "$runs"/shard*.log |
        awk '{s += $1} END {print s + 0}') failed"
    return $rc
}

run_leg() {  # run_leg NAME KERNELS: 2 states × 1 epoch of RSST on the synthetic set, through the newer paths
    vp "
from vitprune.config import from_flags
from vitprune.train import run
run(from_flags(dict(method='rsst', dataset='synthetic', states=2, epochs=1, optimizer='adamw', lr=1e-3,
                    aug='finetune', distill='state0', round_to=8,
                    kernels='$2', wandb='disabled', out_dir='$runs',
                    name='$1', $run_flags)))"
}

compare_runs() {  # the two legs' final accuracies, state by state, and the backend each recorded
    vp "
import json, sys
from pathlib import Path
legs = {name: Path('$runs') / name for name in ('triton', 'torch')}
summary = {name: json.loads((d / 'summary.json').read_text()) for name, d in legs.items()}
if any(s['status'] != 'finished' for s in summary.values()):
    sys.exit('a leg did not finish: %s' % {n: s['status'] for n, s in summary.items()})
states = [[json.loads(line) for line in (d / 'metrics.jsonl').read_text().splitlines()
           if json.loads(line)['kind'] == 'state'] for d in legs.values()]
print('| state | --kernels=$triton_leg (ran: %s): test acc | --kernels=torch (ran: %s): test acc | difference |'
      % (summary['triton']['kernels_backend'], summary['torch']['kernels_backend']))
print('|---|---|---|---|')
worst = 0.0
for a, b in zip(*states):
    diff = a['final_test_acc'] - b['final_test_acc']
    worst = max(worst, abs(diff))
    print('| %d | %.2f | %.2f | %+.2f |' % (a['state'], a['final_test_acc'], b['final_test_acc'], diff))
# Same seed, same data order: only the kernels' rounding differs, so the runs must agree.
print('largest difference %.2f points (limit 3): %s' % (worst, 'agree' if worst <= 3 else 'DISAGREE'))
for name, d in legs.items():
    cfg = json.loads((d / 'config.json').read_text())
    print('%s leg: --aug=%s --distill=%s --round_to=%s' % (name, cfg['aug'], cfg['distill'], cfg['round_to']))
rounded = all(w % 8 == 0 for leg in states for w in leg[-1]['mlp_widths'])
print('state 1 MLP widths (--round_to=8): %s; ratio achieved %.3f: %s' % (states[0][-1]['mlp_widths'],
      states[0][-1]['mlp_ratio_achieved'], 'multiples of 8' if rounded else 'NOT MULTIPLES OF 8'))
sys.exit(0 if worst <= 3 and rounded else 1)"
}

export_check() {  # the triton leg's state 1 exported, loaded back, and compared with the network it trained
    vp "
import json, torch
from vitprune.deploy import export, load_checkpoint, load_exported, masked_model
ck = '$runs/triton/checkpoints/state_01.pt'
export(ck, '$runs/export')
masked, _ = masked_model(load_checkpoint(ck))
x = torch.randn(8, 3, masked.patch_embed.img_size[0], masked.patch_embed.img_size[1])
with torch.inference_mode():
    diff = (load_exported('$runs/export')(x) - masked(x)).abs().max().item()
print('largest difference of the loaded export from the masked network: %.2e (limit 1e-4)' % diff)
assert diff <= 1e-4"
}

export -f vp info gpu_tests run_leg compare_runs export_check
export py repo runs run_flags triton_leg prelude
echo "vitprune GPU check ($([ $cpu = 1 ] && echo 'CPU dry run' || echo CUDA)) -> $out"
rm -f "$out/steps.tmp"
step "device and versions" 20 info.txt info
step "GPU tests (pytest -m gpu)" 120 tests.log gpu_tests
step "bench kernels" 45 bench_kernels.log vp "from vitprune.bench import bench_kernels; bench_kernels($kernels_args)"
step "run --kernels=$triton_leg" 75 runs.log run_leg triton "$triton_leg"
step "run --kernels=torch" 45 runs.log run_leg torch torch
step "runs compared" 10 runs_compared.log compare_runs
step "bench train" 60 bench_train.log vp "from vitprune.bench import bench_train; bench_train($train_args)"
step "export" 30 bench_export.log export_check
step "bench export" 90 bench_export.log vp "from vitprune.bench import bench_export; bench_export($export_args)"
if [ $cpu = 1 ]; then  # inductor's C++ build of three models takes minutes on a CPU
    echo "skipped on --cpu: torch.compile's CPU build of three models takes minutes" >> "$out/bench_train.log"
    printf '%-34s %4s    %s\n' "bench train --compile" - "skipped on --cpu"
    printf '| bench train --compile | - | skipped on --cpu |\n' >> "$out/steps.tmp"
else
    step "bench train --compile" 120 bench_train.log vp \
        "from vitprune.bench import bench_train; bench_train($train_args, compile=True)"
fi

total=$(( $(date +%s) - start ))
{
    kind=$([ $cpu = 1 ] && echo 'CPU dry run (tiny shapes)' || echo CUDA)
    echo "# vitprune GPU check — $(date -u +%Y-%m-%d) — $kind"
    echo; grep -v '^\$ ' "$out/info.txt" | sed 's/^/    /'; echo
    echo "| step | seconds | status |"; echo "|---|---|---|"; cat "$out/steps.tmp"
    echo; echo "Total: $total s."
    echo; echo "## GPU tests"; echo; tail -n 1 "$out/tests.log"
    for log in bench_kernels runs_compared bench_train bench_export; do
        echo; echo "## ${log/_/ }"; echo; grep -v '^\$ ' "$out/$log.log"
    done
} > "$report"
rm -f "$out/steps.tmp"
echo "total ${total} s; report: $report"
exit $failed
