#!/usr/bin/env bash
# GPU evidence for the 8B path, through the same CLI a user runs (one CUDA GPU): a Llama-3-8B-shaped
# model at full depth (32 blocks, random bf16 weights) with LISA (2 of 32 blocks) for 5 steps, with
# FSDP2 and with DeepSpeed ZeRO-3 on one rank. For each: `scalebio plan`'s predicted peak next to
# torch.cuda.max_memory_allocated, both written by `scalebio reweight` into weights.json
# (planned_peak_gib, peak_gpu_memory_gib); then benchmarks/llm_step.py's ScaleBiO/SFT time and
# memory ratios on the 8B shape cut to 6 blocks (all its variants must fit one GPU together).
#
#   bash benchmarks/gpu_scale_check.sh            # on the GPU machine; logs under $OUT
#   SHAPE=tiny bash benchmarks/gpu_scale_check.sh # the same commands on a small model (CPU: no
#                                                 # GPU figures, checks the script itself)
set -uo pipefail
OUT=${OUT:-gpu_out}; SHAPE=${SHAPE:-8b}; STEPS=${STEPS:-5}
mkdir -p "$OUT"
if [ "$SHAPE" = tiny ]; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
python3 - "$OUT" "$SHAPE" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import yaml
out, shape, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
arch = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   rope_theta=500000.0, max_position_embeddings=8192),
        "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     max_position_embeddings=1024)}[shape]
rng = np.random.default_rng(0)
letters = np.array(list("abcdefghij klmnopqrstuvwxyz"))
data = out / "data"
data.mkdir(parents=True, exist_ok=True)
for name in ("a", "b", "c", "val"):  # long answers: every sequence is cut to max_length
    rows = [{"instruction": "x", "input": "", "output": "".join(rng.choice(letters, 2048))}
            for _ in range(16)]
    (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
for kind in ("fsdp2", "zero3"):
    raw = {"model": {"config": {"model_type": "llama", "pad_token_id": 0, "bos_token_id": 1,
                                "eos_token_id": 2, **arch},
                     "tokenizer": "char", "dtype": "bfloat16"},
           "data": {"sources": [{"name": n, "path": str(data / f"{n}.jsonl")} for n in "abc"],
                    "validation": [{"path": str(data / "val.jsonl")}], "max_length": 512,
                    "per_source": 2, "val_batch": 3, "micro_batch_size": 2},
           "bilevel": {"steps": steps},
           "lisa": {"enabled": True, "n_active": 2, "period": 2},
           "engine": {"kind": "deepspeed" if kind == "zero3" else kind, "zero_stage": 3,
                      "bf16": True},
           "run": {"checkpoint_every": 0, "tracker": "none"}}
    (out / f"{kind}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
PY
MEM=$(python3 -c "import torch; print(f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}GiB' if torch.cuda.is_available() else '80GiB')")
for kind in fsdp2 zero3; do
  python3 -m scalebio plan --config "$OUT/$kind.yaml" --gpus 1 --gpu-memory "$MEM" > "$OUT/plan_$kind.txt" 2>&1
  rm -rf "$OUT/run_$kind"
  /usr/bin/time -v python3 -m torch.distributed.run --nproc_per_node 1 -m scalebio reweight \
    --config "$OUT/$kind.yaml" --out "$OUT/run_$kind" --no-progress > "$OUT/reweight_$kind.txt" 2>&1
  echo "$kind: reweight exit $?"
  python3 - "$OUT/run_$kind/weights.json" "$kind" <<'PY'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
w = json.loads(p.read_text()) if p.is_file() else {}
plan, peak = w.get("planned_peak_gib"), w.get("peak_gpu_memory_gib")
ratio = f"{plan / peak:.3f}" if plan and peak else "n/a"
print(f"{sys.argv[2]}: planned {plan} GiB, torch.cuda.max_memory_allocated {peak} GiB, "
      f"planned/measured {ratio}")
PY
done | tee "$OUT/plan_vs_measured.txt"
if [ "$SHAPE" = 8b ]; then
  timeout 300 python3 benchmarks/llm_step.py --shape 8b --layers 6 --batch 4 --seq 512 --rounds 3 \
    --warmup 1 2>&1 | tee "$OUT/llm_step_8b.txt"
fi
