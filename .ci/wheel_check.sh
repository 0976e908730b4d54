#!/usr/bin/env bash
# The package as users get it: build the wheel, install it NON-editable (with the llm extra) into a
# fresh venv, import every module of the source tree from site-packages, and run one tiny command
# of each subcommand family from a folder outside the checkout (so the source tree is not on
# sys.path). An editable install hides a package missing from pyproject.toml; this does not.
# Usage: bash .ci/wheel_check.sh   (a few minutes on 2 cores; pip reuses its cache)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export DS_ACCELERATOR=cpu PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
start=$SECONDS
say() { echo "wheel [$((SECONDS - start)) s] $*"; }
# run NAME CMD...: the command's output goes to NAME.log, shown (less pip's index noise) and
# its exit status returned only on failure
run() {
  local name=$1 rc=0
  shift
  "$@" > "$work/$name.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    grep -v "is ignored: it is neither" "$work/$name.log" | tail -40 >&2
    echo "wheel: $name failed (exit $rc): $*" >&2
    exit "$rc"
  fi
}

# Build from a copy of the files git tracks or would track (not ignored): setuptools writes
# build/ and *.egg-info next to the sources, and the checkout stays clean.
mkdir "$work/src" "$work/dist" "$work/run"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf -) | tar -xf - -C "$work/src"
run build python3 -m pip wheel --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work/dist"/scalebio-*.whl)
say "built $(basename "$wheel")"

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# torch first, the pinned CPU release, so the llm extra's dependencies never pick another build
run pip-torch "$py" -m pip install torch==2.13.0
run pip-wheel "$py" -m pip install "${wheel}[llm]"
if "$py" -m pip show scalebio | grep -q "^Editable project location"; then
  echo "wheel: scalebio was installed editable" >&2; exit 1
fi
say "installed into a fresh venv"

cd "$work/run"  # outside the checkout: only site-packages can provide scalebio
"$py" -I "$repo/.ci/wheel_imports.py" "$work/src"
run main "$py" -I -m scalebio --help
say "imports ok"
bin="$work/venv/bin/scalebio"
run validate "$bin" validate --quick --out validate
say "validate ok"
# 2 steps cannot order the sources: exit 1 (clean not on top) is the demo's verdict, not a fault;
# 2 (bad input) or a crash fails here.
rc=0
"$bin" demo --out demo --steps 2 --per-source 2 --no-progress > "$work/demo.log" 2>&1 || rc=$?
if [ "$rc" -gt 1 ] || [ ! -f demo/demo.json ] || [ ! -f demo/config.yaml ]; then
  tail -40 "$work/demo.log" >&2; echo "wheel: scalebio demo failed (exit $rc)" >&2; exit 1
fi
# the config the demo wrote works from an installed package (its paths are relative to it)
run reweight "$bin" reweight --config demo/config.yaml --out again --bilevel.steps 2 --no-progress
run baseline "$bin" baseline --method uniform --config demo/config.yaml --out uniform --no-progress
run mix "$bin" mix --weights again/weights.json --num-examples 16 --out mix --no-progress
run sft "$bin" sft --config demo/config.yaml --data mix --out sft --bilevel.steps 2 --no-progress
run evaluate "$bin" evaluate --model sft/model --config demo/config.yaml --out eval \
  --max-examples 4 --no-progress
say "demo, reweight, baseline, mix, sft, evaluate ok"
run compare "$bin" compare --quick --methods scalebio --seeds 0 --num-examples 16 --out compare \
  --no-progress
test -f compare/compare.json
say "compare ok; wheel check passed"
