#!/usr/bin/env bash
# The measurements that need a many-core machine (issue 10: the 2-core machines measured so far say
# nothing of how rows per step, streams and the kernels scale), in one go, most needed first. Runs on
# any Linux machine with many cores where the project is installed with torch (`pip install -e .`,
# see README), from this repository:
#
#     bash bench/many_cores.sh        # OUT=folder MANY_CORES_SECONDS=510 MANY_CORES_IMAGES=96 PYTHON=python3
#
# It builds the full-size checkpoint and its int8 export (cached; on AMX the static int8 text decoder
# is calibrated on transformers' captions: minutes), then runs each check until the deadline
# (MANY_CORES_SECONDS from the start, default 510 s: a 10-minute slot), each writing its output to
# $OUT/<check>.txt as it ends (default: a new temporary folder), so a run cut short still leaves what
# it finished. Every benchmark prints its CPU line and ratios measured in its own run.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
deadline=$((SECONDS + ${MANY_CORES_SECONDS:-510}))
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/many-cores.XXXXXX")}
images=${MANY_CORES_IMAGES:-96}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! "$python" -c "import pipeline, openvino, nncf, torch, transformers" 2> "$out/log.txt"; then
    echo "$python cannot import the project with openvino, nncf, torch and transformers: pip install -e . first" >&2
    cat "$out/log.txt" >&2
    exit 2
fi
echo "output in $out"

check() {  # check NAME COMMAND...: run it until the deadline, its output in $OUT/NAME.txt
    local name=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then echo "$name: skipped, no time left" | tee -a "$out/log.txt"; return; fi
    local started=$SECONDS
    timeout "$left" "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$out/log.txt"
}

"$python" -c "from bench.harness import cpu; print(cpu())" | tee "$out/log.txt"
# the checkpoint and the int8 export every check uses: export time and peak memory on this machine
check export "$python" -m bench.export_full_size --formats int8
# every core: the defaults against transformers at batch 8 and 32, then more rows per step
check fixed "$python" -m bench.real_lengths --images-n "$images" --rounds 1 --rows 0 64 --fixed 32 --tf-batches 8 32
# two of the cores, as the 2-core machines: which kernels, in which precision, per graph
if command -v taskset > /dev/null; then
    check profile-2-cores taskset -c 0,1 "$python" -m bench.profile_ops --calls 2
    check profile-2-cores-bf16 taskset -c 0,1 "$python" -m bench.profile_ops --calls 2 --precision bf16
else
    echo "profile-2-cores: skipped, no taskset" | tee -a "$out/log.txt"
fi
check real-lengths "$python" -m bench.real_lengths --images-n "$images" --rounds 1 --rows 0
check profile "$python" -m bench.profile_ops --calls 2 --rows 64
# the text decoder with int8 weights only (model.quantize_text_decoder=false, the default without AMX)
check decoder-weights-only "$python" -m bench.real_lengths --images-n "$images" --rounds 1 --rows 0 --fixed 32 \
    --tf-batches 32 --decoder-weights-only
