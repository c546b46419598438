#!/usr/bin/env bash
# Issue 10's measurements that need a machine this project's own lack (an Intel Xeon with AMX, 16
# cores), in one call of the `device` tool, whose machines have 16 cores, Python 3.12 and torch but
# neither OpenVINO nor Hydra, and reach no registry. Prepare here, once:
#
#     bash ../shared/device/make_site.sh .dev && echo /.dev/ >> .git/info/exclude
#
# then one device call, carry [".dev"], timeout_s 600:  bash bench/many_cores.sh
#
# It builds the full-size checkpoint and its int8 export there (a static int8 decoder on AMX: its
# calibration captions each photo with transformers; ~5 minutes on 2 cores, unmeasured on 16), then runs
# the checks most needed first, each cut off at the deadline (MANY_CORES_SECONDS, default 510 s from
# the start), each writing its table to $OUT as it ends, so a call cut short still brings back what
# it finished. Each benchmark prints its CPU line and ratios measured in its own run.
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${MANY_CORES_SECONDS:-510}))
out=${OUT:-/tmp/many_cores}
mkdir -p "$out"
if [ -f .dev/site.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .dev/site.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 KOSMOS_ANNOTATE_CACHE=${KOSMOS_ANNOTATE_CACHE:-/tmp/kosmos-cache}
images=${MANY_CORES_IMAGES:-96}

check() {  # check NAME COMMAND...: run it until the deadline, its output in $OUT/NAME.txt
    local name=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then echo "$name: skipped, no time left" | tee -a "$out/log.txt"; return; fi
    local started=$SECONDS
    timeout "$left" "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$out/log.txt"
}

python3 -c "import sys; sys.path.insert(0, 'bench'); from harness import cpu; print(cpu())" | tee "$out/log.txt"
check export python3 -c "
import sys; sys.path[:0] = ['.', 'bench']
from export_full_size import CACHE, full_size_checkpoint
from pipeline.config import ModelConfig
from pipeline.export import ensure_export
ensure_export(ModelConfig(source=str(full_size_checkpoint()), dir=str(CACHE / 'export-int8'), weight_format='int8'))"
# every core: the defaults against transformers at batch 8 and 32, then more rows per step
check fixed python3 bench/real_lengths.py --images-n "$images" --rounds 1 --rows 0 64 --fixed 32 --tf-batches 8 32
# two of the cores, as the issue's 2-core AMX machine: which kernels, in which precision, per graph
check profile-2-cores taskset -c 0,1 python3 bench/profile_ops.py --calls 2
check profile-2-cores-bf16 taskset -c 0,1 python3 bench/profile_ops.py --calls 2 --precision bf16
check real-lengths python3 bench/real_lengths.py --images-n "$images" --rounds 1 --rows 0
check profile python3 bench/profile_ops.py --calls 2 --rows 64
# the text decoder with int8 weights only (model.quantize_text_decoder=false, the default without AMX) on every core
check decoder-weights-only python3 bench/real_lengths.py --images-n "$images" --rounds 1 --rows 0 --fixed 32 --tf-batches 32 --decoder-weights-only
