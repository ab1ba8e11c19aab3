#!/usr/bin/env bash
# A short UNITER-base training on generated shards, on one GPU, in bf16: prints samples/s,
# tokens/s, peak GPU memory and MFU from the run's metrics.jsonl.
#
#   bash tools/bench_gpu.sh [OUT_DIR] [STEPS] [KEY=VALUE ...]   (extra recipe overrides)
#
# Uses the real pipeline (shards -> workers -> token-budget batches) and the released
# recipe (61440 tokens per micro-batch, 4 tasks sampled 6:8:4:4, WRA on ITM batches),
# without accumulation so every logged step is one optimizer update. The step-only part runs the
# trainer's step: real-token counts read on the CPU, fused AdamW taking the clip and the
# non-finite skip on the device (no host sync), the trunk unpadded.
set -euo pipefail
OUT_DIR=${1:-/tmp/vlpt-gpu-check}
STEPS=${2:-120}
shift $(( $# < 2 ? $# : 2 ))
SAMPLES=${SAMPLES:-8000}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
$PY tools/synthetic_shards.py --out "$OUT_DIR/syn" --samples "$SAMPLES" --shard-size 500 --regions 36-36 --caption-words 10-25
# the built-in objectives by path, so this also runs from a plain checkout (no pip install)
PLUGINS="[objectives/mlm.py, objectives/itm.py, objectives/mrfr.py, objectives/mrc.py, objectives/wra.py]"
if $PY -c "import vlpt_objectives" 2>/dev/null; then PLUGINS="[]"; fi
OVERRIDES=("plugins=$PLUGINS" "data.train=[{shards: '$OUT_DIR/syn/syn-*.tar'}]" data.val=null
  model.tokenizer="$OUT_DIR/syn/tokenizer.json" train.accumulate=1 train.precision=bf16 "$@")
echo "== training step alone (pre-built batches from the same pipeline, no data loading) =="
$PY - "${OVERRIDES[@]}" <<'PY'
import sys, time, torch
from vlpt.recipe import load_recipe
from vlpt.build import build_model, task_streams
from vlpt.data.sources import resolve_sources
from vlpt.data.collate import move_to
from vlpt.train.flops import device_peak_flops, train_step_flops
from vlpt.train.mixing import TaskMixer
from vlpt.train.optim import build_optimizer, clipped_step
from vlpt.model.packing import real_count_known
from vlpt.train.logbook import batch_stats
r = load_recipe("recipes/uniter-base.yaml", sys.argv[1:])
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
built = build_model(r)
sources, _ = resolve_sources(r, progress=False)
streams = task_streams(built, sources)
batches = {}
for name, s in streams.items():
    it = iter(s)
    cpu = [{k: v for k, v in next(it).items() if not k.startswith("data_")} for _ in range(6)]
    batches[name] = [(move_to(b, dev), batch_stats(b)[1]) for b in cpu]  # real tokens counted on the CPU
model = built.model.to(dev).train()
opt = build_optimizer(model, r.train)
params = list(model.parameters())
mixer = TaskMixer(list(r.tasks), [t.weight for t in r.tasks.values()], "sample", 0)
def step(i):
    task = mixer.tasks_for(i)[0]
    b, real = batches[task][i % 6]
    with torch.autocast(dev.type, dtype=torch.bfloat16), real_count_known(b, real):
        loss, _ = model(task, b)
    loss.backward()
    clipped_step(opt, params, r.train.clip)
    opt.zero_grad(set_to_none=True)
    n = b["input_ids"].shape[0]; L = b["input_ids"].shape[1] + b["features"].shape[1]
    return n, train_step_flops(model.vl.config, n, L, tokens=real)
for i in range(10 if dev.type == "cuda" else 1): step(i)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
sync(); dev.type == "cuda" and torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter(); samples = flops = 0
N = 100 if dev.type == "cuda" else 4
for i in range(10, 10 + N):
    n, f = step(i); samples += n; flops += f
sync(); dt = time.perf_counter() - t0
mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
peak, src = device_peak_flops(dev, "bf16")
print(f"step only: {samples / dt:.0f} samples/s, {dt / N * 1e3:.1f} ms/update, MFU {flops / dt / peak:.1%} "
      f"(peak {peak / 1e12:.0f} TFLOP/s, {src}), peak memory {mem:.1f} GiB")
PY
echo "== vlpt train: the whole pipeline =="
$PY -m vlpt.cli train recipes/uniter-base.yaml --no-resume --force "${OVERRIDES[@]}" \
  data.num_workers=3 train.steps="$STEPS" train.warmup=10 \
  log.every=10 log.progress=false eval.at_end=false checkpoint.at_end=false \
  output_dir="$OUT_DIR/run"
$PY - "$OUT_DIR/run/metrics.jsonl" <<'PY'
import json, statistics, sys, torch
rows = [json.loads(l) for l in open(sys.argv[1]) if '"samples_per_s"' in l]
rows = rows[2:] or rows  # skip warm-up (compilation of kernels, worker start)
med = lambda k: statistics.median(r[k] for r in rows)
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
print(f"steps logged: {len(rows)} (median over steps {rows[0]['step']}..{rows[-1]['step']})")
print(f"samples/s: {med('samples_per_s'):.1f}   tokens/s: {med('tokens_per_s'):.0f}   padding: {med('padding'):.1%}")
print(f"MFU: {med('mfu'):.1%}   peak GPU memory: {max(r.get('peak_memory_gib', 0) for r in rows):.1f} GiB")
PY
