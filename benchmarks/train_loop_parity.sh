#!/usr/bin/env bash
# The Trainer recipe against the home-made loop it replaced (commit 24fe378), interleaved, on the
# same run: codebook (examples/tasks.py, 1280 records), MoKA at a rank-2 LoRA's size on q,v
# (--budget 115776), the 4-bit SmolLM2-135M, batch 16, 20 steps, 1 thread, no eval; 5 repeats.
# Prints "impl repeat tokens/s train_s wall_s" lines; results/train-loop-parity.json has a run.
#   bash benchmarks/train_loop_parity.sh        (OLD_TREE: a worktree of the old commit)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD_TREE=${OLD_TREE:-/tmp/old}
WORK=${WORK:-/tmp/parity}
[ -d "$OLD_TREE" ] || git -C "$ROOT" worktree add -f "$OLD_TREE" 24fe378
mkdir -p "$WORK"
"$ROOT/.venv/bin/python" - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "examples")
from tasks import make_task, write_jsonl
train, _ = make_task("codebook", 1280, 200, 0)
write_jsonl(Path(sys.argv[1]) / "train.jsonl", train)
PY
# The old commit's moka-train in this venv: drop the editable finder, put the old tree first.
cat > "$WORK/run_old.py" <<PY
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, "$OLD_TREE")
from moka_trainer.cli import main
sys.exit(main())
PY
ARGS=(--data "$WORK/train.jsonl" --budget 115776 --batch-size 16 --micro-batch-size 16
      --max-steps 20 --lr 1e-2 --threads 1 --quiet)
cd "$WORK"
for rep in 1 2 3 4 5; do
  for impl in old new; do
    out=$WORK/speed-$impl-$rep; rm -rf "$out"
    if [ $impl = old ]; then
      OMP_NUM_THREADS=1 "$ROOT/.venv/bin/python" "$WORK/run_old.py" "${ARGS[@]}" --out "$out" 2>/dev/null
    else
      OMP_NUM_THREADS=1 "$ROOT/.venv/bin/moka-train" "${ARGS[@]}" --out "$out" 2>/dev/null
    fi
    python3 -c "import json; i=json.load(open('$out/train_info.json')); print('$impl', $rep, round(i['train_tokens_per_s'], 1), i['train_time_s'], i['wall_time_s'])"
  done
done
