#!/bin/bash
# make test-slurm        (or, as root: PYTHON=/path/to/venv/bin/python bash tests/slurm/run_slurm_test.sh)
#
# The launch/ scripts for real, on CPU (gloo), on a one-node Slurm cluster made on this machine
# from Debian's packages (tests/slurm/cluster.sh; needs root and apt): single_node.sbatch with
# 2 ranks, multi_node.sbatch with 1 node x 2 ranks (a real c10d rendezvous), array.sbatch with 2
# tasks over 3 clips, a preemption (USR2 to the batch script -> SIGTERM to the ranks -> requeue ->
# the rerun resumes), a mis-set srun/torchrun layout and a node-private output folder (both must
# stop with one clear error), srun without torchrun (Slurm variables -> RANK/WORLD_SIZE/...), and
# the Hydra submitit multirun (skipped when hydra-submitit-launcher is not installed). Prints a
# PASS/FAIL line per case with its duration, and always tears the daemons down.
# Knobs: PYTHON (default .venv/bin/python), VSR_SLURM_WORK (default a new /tmp/vsr_slurm.XXXXXX),
# VSR_SLURM_CASES (default all: single multi array preempt misset private_output srun_direct multirun
# multirun_fail).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/slurm
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
WORK=${VSR_SLURM_WORK:-$(mktemp -d /tmp/vsr_slurm.XXXXXX)}
mkdir -p "$WORK/logs"
T0=$SECONDS

if [ "$(id -u)" != 0 ]; then
    echo "FAIL: make test-slurm needs root (it installs and runs slurmctld, slurmd and munged)"
    exit 1
fi
[ -x "$PYTHON" ] || { echo "FAIL: no python at $PYTHON (set PYTHON=...)"; exit 1; }

bash "$HERE/cluster.sh" install || { echo "FAIL: could not install Slurm"; exit 1; }
trap 'bash "$HERE/cluster.sh" down "$WORK"' EXIT
bash "$HERE/cluster.sh" up "$WORK" || { echo "FAIL: Slurm did not start (logs in $WORK/log)"; exit 1; }
export SLURM_CONF=$WORK/slurm.conf
# torchrun and python of this venv, in the jobs too (sbatch hands the environment on).
export PATH=$(dirname "$PYTHON"):$PATH
export OMP_NUM_THREADS=1
NODE=$(hostname -s)
cd "$WORK"  # sbatch's own %x-%j.out files land here
"$PYTHON" "$HERE/helpers.py" inputs "$WORK" || { echo "FAIL: could not make the inputs"; exit 1; }

helper() { "$PYTHON" "$HERE/helpers.py" "$@"; }
# Slurm's knobs for a node without GPUs; the scripts' own defaults ask for 8 GPUs and 64 CPUs.
CPU_ONLY=(--gpus-per-node=0 --cpus-per-task=1 --time=20)
JOB=(job=upscale device=cpu log.progress=false encode.preset=ultrafast)

job_states() { scontrol -o show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*\|ExitCode=[0-9:]*\|Restarts=[0-9]*' | paste -sd' '; }

wait_job() {  # JOB_ID TIMEOUT_S: until nothing of it is left in the queue (array tasks included)
    local deadline=$((SECONDS + $2))
    while [ -n "$(squeue -h -j "$1" -o %i 2>/dev/null)" ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "job $1 still in the queue after $2 s: $(job_states "$1")"
            return 1
        fi
        sleep 2
    done
    echo "job $1: $(job_states "$1")"
}

wait_ok() {  # JOB_ID TIMEOUT_S: finished, every record COMPLETED with exit code 0
    wait_job "$1" "$2" || return 1
    local states
    states=$(scontrol -o show job "$1" | grep -o 'JobState=[A-Z_]* \|ExitCode=[0-9:]*' | paste -sd' ')
    if echo "$states" | grep -q 'JobState=\(FAILED\|CANCELLED\|TIMEOUT\|NODE_FAIL\|OUT_OF_MEMORY\)\|ExitCode=[1-9]\|ExitCode=0:[1-9]'; then
        echo "job $1 did not complete: $states"
        return 1
    fi
}

case_single() {
    local out=$WORK/out/single j
    j=$(VSR_NPROC=2 sbatch --parsable "${CPU_ONLY[@]}" "$ROOT/launch/single_node.sbatch" "${JOB[@]}" \
        input="$WORK/in/one" output="$out" job.model=lanczos job.scale=2 work.segment_frames=8) || return 1
    wait_ok "$j" 300 || return 1
    helper check "$out" --video clip=48 --report run_report.json || return 1
    ls "$out/.vsr_ddp/logs/rank0.log" "$out/.vsr_ddp/logs/rank1.log" "$out/.vsr_ddp/logs/slurm-$j.out" || return 1
}

case_multi() {
    local out=$WORK/out/multi j
    j=$(VSR_NPROC=2 sbatch --parsable --nodes=1 "${CPU_ONLY[@]}" "$ROOT/launch/multi_node.sbatch" "${JOB[@]}" \
        input="$WORK/in/one" output="$out" job.model=lanczos job.scale=2 work.segment_frames=8) || return 1
    wait_ok "$j" 300 || return 1
    helper check "$out" --video clip=48 --report run_report.json || return 1
    grep "rendezvous $NODE" "$out/.vsr_ddp/logs/slurm-$j.out" || return 1
    ls "$out/.vsr_ddp/logs/rank1.log" || return 1
}

case_array() {
    local out=$WORK/out/array j
    j=$(VSR_NPROC=2 sbatch --parsable --array=0-1 "${CPU_ONLY[@]}" "$ROOT/launch/array.sbatch" "${JOB[@]}" \
        input="$WORK/in/many" output="$out" job.model=lanczos job.scale=2 work.segment_frames=8) || return 1
    wait_ok "$j" 400 || return 1
    # sorted a, b, c: task 0 takes a and c, task 1 takes b; one report each, none clobbered.
    helper check "$out" --video a=24 --video c=36 --report run_report.0-of-2.json --no-report run_report.json \
        || return 1
    helper check "$out" --video b=30 --report run_report.1-of-2.json || return 1
    ls "$out/.vsr_ddp/logs/shard_0-of-2/rank1.log" "$out/.vsr_ddp/logs/shard_1-of-2/rank1.log" \
        "$out/.vsr_ddp/logs/slurm-${j}_0.out" "$out/.vsr_ddp/logs/slurm-${j}_1.out" || return 1
}

case_preempt() {
    local out=$WORK/out/preempt wdir j deadline log
    wdir=$out/.vsr_ddp/long_2x
    j=$(VSR_NPROC=2 sbatch --parsable "${CPU_ONLY[@]}" "$ROOT/launch/single_node.sbatch" "${JOB[@]}" \
        input="$WORK/in/long" output="$out" job.model="$WORK/model_x2.pth" work.segment_frames=4 \
        job.batch_size=1 work.read_chunk=1) || return 1
    log=$out/.vsr_ddp/logs/slurm-$j.out
    deadline=$((SECONDS + 300))
    until [ "$(ls "$wdir"/segment_*[0-9].json 2>/dev/null | wc -l)" -ge 4 ]; do
        [ $SECONDS -lt $deadline ] || { echo "no shards after 300 s: $(job_states "$j")"; return 1; }
        sleep 0.5
    done
    echo "$(date +%T) $(ls "$wdir"/segment_*[0-9].json | wc -l) shard(s) done: USR2 to the batch script"
    scancel --signal=USR2 --batch "$j" || return 1
    deadline=$((SECONDS + 180))
    until job_states "$j" | grep -q 'JobState=PENDING.*Restarts=1'; do
        [ $SECONDS -lt $deadline ] || { echo "not requeued after 180 s: $(job_states "$j")"; return 1; }
        sleep 1
    done
    echo "$(date +%T) requeued: $(job_states "$j")"
    if ls "$wdir"/*.partial 2>/dev/null; then echo "partial files left behind"; return 1; fi
    helper snapshot "$wdir" "$WORK/preempt_snapshot.json" || return 1
    # Slurm holds a requeued job for about two minutes (BeginTime); no need to wait for that here.
    scontrol update JobId="$j" StartTime=now || return 1
    wait_ok "$j" 600 || return 1
    # The kept shards are the ones snapshotted, unchanged, and the requeued run's rank logs count
    # exactly those as already done.
    helper compare "$wdir" "$WORK/preempt_snapshot.json" --logs "$out/.vsr_ddp/logs" || return 1
    helper check "$out" --video long=240 --report run_report.json || return 1
    grep "USR2: stopping the ranks" "$log" || return 1
    grep "restart 1" "$log" || return 1
}

case_misset() {
    # Two torchrun tasks on one node, each with its own --standalone world: every input twice.
    local out=$WORK/out/misset j
    j=$(VSR_NPROC=1 sbatch --parsable --ntasks-per-node=2 "${CPU_ONLY[@]}" "$ROOT/launch/single_node.sbatch" \
        "${JOB[@]}" input="$WORK/in/one" output="$out" job.model=lanczos job.scale=2) || return 1
    wait_job "$j" 300 || return 1
    job_states "$j" | grep -q 'JobState=FAILED' || { echo "expected FAILED"; return 1; }
    grep "^error: srun started 2 torchrun task(s) on 1 node(s)" "$out/.vsr_ddp/logs/slurm-$j.out" | head -n 1 \
        || return 1
    [ ! -e "$out/clip.mp4" ] || { echo "the job did work"; return 1; }
}

case_private_output() {
    local out=$WORK/out/private j
    j=$(sbatch --parsable --ntasks=2 --cpus-per-task=1 --time=10 --output="$WORK/logs/private-%j.out" \
        "$HERE/private_output.sbatch" "$out" "${JOB[@]}" input="$WORK/in/one" output="$out" \
        job.model=lanczos job.scale=2) || return 1
    wait_job "$j" 300 || return 1
    job_states "$j" | grep -q 'ExitCode=2:0' || { echo "expected exit status 2"; return 1; }
    grep "^error: output folder $out is not shared between the nodes (rank 0 on $NODE cannot see rank(s) 1 ($NODE)" \
        "$WORK/logs/private-$j.out" || return 1
}

case_srun_direct() {
    # srun starts the ranks itself (what submitit does): RANK/WORLD_SIZE/MASTER_* from Slurm's variables.
    local out=$WORK/out/srun j
    j=$(sbatch --parsable --ntasks=2 --cpus-per-task=1 --time=10 --output="$WORK/logs/srun-%j.out" \
        --wrap "srun python -m vsr_ddp ${JOB[*]} input=$WORK/in/one output=$out job.model=lanczos job.scale=2 work.segment_frames=8") \
        || return 1
    wait_ok "$j" 300 || return 1
    helper check "$out" --video clip=48 --report run_report.json || return 1
    # both tasks formed one world of 2 and rank 1 worked in it (its host file, written at start-up under
    # .vsr_ddp/hosts/<run>/, goes with the run: what is left is the run's logs and sidecars)
    helper ranks "$out" --world 2 || return 1
}

case_multirun() {
    local out=$WORK/out/sweep sweep
    # shellcheck disable=SC2016  # ${job.scale} is Hydra's, not the shell's
    timeout 900 "$PYTHON" -m vsr_ddp -m hydra/launcher=slurm hydra.launcher.gpus_per_node=null \
        hydra.launcher.tasks_per_node=2 hydra.launcher.cpus_per_task=1 hydra.launcher.timeout_min=15 \
        "${JOB[@]}" input="$WORK/in/one" "output=$out/s\${job.scale}" job.model=lanczos job.scale=2,3 \
        work.segment_frames=8 || return 1
    helper check "$out/s2" --video clip=48 --report run_report.json || return 1
    helper check "$out/s3" --video clip=48 --report run_report.json || return 1
    # A sweep's rank logs are not under its outputs: conf/config.yaml's hydra.sweep.dir
    # (multirun/<date>/<time>, relative to the folder the sweep started in, here $WORK) and
    # log.dir=null (a sweep point: hydra.runtime.output_dir) put point k's logs in <sweep dir>/<k>/rank<N>.log
    # (vsr_ddp/logs.py); submitit's own files go to <sweep dir>/.submitit/<job id>/.
    sweep=$(ls -td "$WORK"/multirun/*/*/ 2>/dev/null | head -n 1)
    [ -n "$sweep" ] || { echo "no sweep folder under $WORK/multirun"; return 1; }
    ls "$sweep"0/rank0.log "$sweep"0/rank1.log "$sweep"1/rank0.log "$sweep"1/rank1.log || return 1
    grep -l "output=$out/s2\$" "$sweep"0/rank0.log || return 1
    grep -l "output=$out/s3\$" "$sweep"1/rank0.log || return 1
    ls -d "$sweep".submitit || return 1
}

case_multirun_fail() {
    # One bad sweep point (job.scale=0 with lanczos: a configuration error on Slurm): the sweep must
    # fail, and the other point still runs to the end.
    local out=$WORK/out/sweepfail status
    # shellcheck disable=SC2016  # ${job.scale} is Hydra's, not the shell's
    timeout 900 "$PYTHON" -m vsr_ddp -m hydra/launcher=slurm hydra.launcher.gpus_per_node=null \
        hydra.launcher.tasks_per_node=2 hydra.launcher.cpus_per_task=1 hydra.launcher.timeout_min=15 \
        "${JOB[@]}" input="$WORK/in/one" "output=$out/s\${job.scale}" job.model=lanczos job.scale=0,2 \
        work.segment_frames=8 2>"$WORK/logs/multirun_fail.stderr"
    status=$?
    cat "$WORK/logs/multirun_fail.stderr"
    [ $status = 2 ] || { echo "expected exit status 2 (the failed point's), got $status"; return 1; }
    grep "sweep point #0 (.*job.scale=0.*) exited with status 2" "$WORK/logs/multirun_fail.stderr" || return 1
    helper check "$out/s2" --video clip=48 --report run_report.json || return 1
    [ ! -e "$out/s0/run_report.json" ] || { echo "the bad point did work"; return 1; }
}

RESULTS=()
FAILED=0
CASES=" ${VSR_SLURM_CASES:-single multi array preempt misset private_output srun_direct multirun multirun_fail} "
run_case() {  # NAME DESCRIPTION
    local name=$1 what=$2 t=$SECONDS status
    case $CASES in *" $name "*) ;; *) return ;; esac
    echo "== $name: $what"
    if [ "${name%_fail}" = multirun ] && ! "$PYTHON" -c "import hydra_plugins.hydra_submitit_launcher" 2>/dev/null; then
        RESULTS+=("$(printf 'SKIP  %-15s %-62s %5s' "$name" "$what" "-") (pip install 'vsr_ddp[slurm]')")
        return
    fi
    "case_$name" >"$WORK/logs/$name.log" 2>&1
    status=$?
    local d=$((SECONDS - t))
    if [ $status = 0 ]; then
        RESULTS+=("$(printf 'PASS  %-15s %-62s %4d s' "$name" "$what" "$d")")
    else
        FAILED=$((FAILED + 1))
        RESULTS+=("$(printf 'FAIL  %-15s %-62s %4d s' "$name" "$what" "$d")")
        echo "-- $name failed; its log ($WORK/logs/$name.log):"
        tail -n 30 "$WORK/logs/$name.log"
        for f in $(ls -t "$WORK"/out/"$name"*/.vsr_ddp/logs/slurm-*.out "$WORK"/multirun/*/*/.submitit/*/*.err \
                2>/dev/null | head -n 2); do
            echo "-- $f:"
            tail -n 30 "$f"
        done
    fi
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/   /'
}

run_case single "single_node.sbatch: 1 node x 2 ranks, 48 frames"
run_case multi "multi_node.sbatch: 1 node x 2 ranks, c10d rendezvous"
run_case array "array.sbatch: 2 tasks over 3 clips, one report each"
run_case preempt "USR2 -> SIGTERM -> requeue -> resume (240 frames, a model)"
run_case misset "2 torchrun tasks on 1 node: one clear error, no work"
run_case private_output "output folder not shared between ranks: one clear error"
run_case srun_direct "srun without torchrun: 2 tasks, Slurm variables"
run_case multirun "Hydra multirun, hydra/launcher=slurm, job.scale=2,3"
run_case multirun_fail "Hydra multirun on Slurm, one bad point: exit 2, the other done"

echo
echo "== make test-slurm: $(date -Is), $(sinfo --version), node $NODE ($(nproc --all) CPUs, no GPU), work in $WORK"
printf '%s\n' "${RESULTS[@]}"
if [ $FAILED = 0 ]; then
    echo "PASS: all cases in $((SECONDS - T0)) s"
else
    echo "FAIL: $FAILED case(s) failed, $((SECONDS - T0)) s; logs in $WORK/logs and $WORK/out/*/.vsr_ddp/logs"
fi
[ $FAILED = 0 ]
