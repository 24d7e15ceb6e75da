#!/usr/bin/env bash
# The package as a user gets it: build the wheel from this checkout, install it with its runtime dependencies only
# into a fresh venv outside the repository, and run mcti from a folder outside the repository:
#
#   .ci/wheel_smoke.sh      (after the tests in .ci/run; also `make wheel-smoke`)
#
# Checks that every file below mcti_jax/ (code, the configs, the tiny models' assets) is in the wheel, that
# `mcti --help`, `mcti train --config mcti:tiny --help` and a quick `mcti demo` run from the installed wheel, that
# mcti_jax is imported from the venv and not from the checkout, and that the runtime pulls in neither torch nor
# tensorflow. Prints how long each step took.
#
# Settings (environment variables, [default]):
#   SMOKE_PYTHON   the interpreter of the fresh venv (Python >= 3.11) [python3]
#   BUILD_PYTHON   the interpreter that builds the wheel [.venv/bin/python if there, else python3]
#   KEEP           1: keep the temporary folder (wheel, venv, demo output) and print where it is [0]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
SMOKE_PYTHON=${SMOKE_PYTHON:-python3}
if [[ -z ${BUILD_PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then BUILD_PYTHON=.venv/bin/python; else BUILD_PYTHON=python3; fi
fi
KEEP=${KEEP:-0}

die() {
  echo "wheel_smoke: $*" >&2
  exit 1
}

TMP=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/mcti-wheel-smoke.XXXXXX")" && pwd -P)
case $TMP/ in "$REPO"/*) die "the temporary folder $TMP is inside the repository: set TMPDIR elsewhere" ;; esac
cleanup() {
  if [[ $KEEP == 1 ]]; then echo "wheel_smoke: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

VPY=$TMP/venv/bin/python MCTI=$TMP/venv/bin/mcti
TIMES=()
# step NAME COMMAND...: runs it in a subshell that stops at the first failing command (set -e, which bash would
# ignore in a function called as `f || ...`), says how long it took, and stops the script if it failed.
step() {
  local name=$1 start end rc
  shift
  echo "=== $name"
  start=$(date +%s%N)
  set +e
  (
    set -e
    "$@"
  )
  rc=$?
  set -e
  end=$(date +%s%N)
  local took
  took=$(awk -v ns=$((end - start)) 'BEGIN { printf "%.1f", ns / 1e9 }')
  TIMES+=("$(printf '%-38s %7s s' "$name" "$took")")
  echo "--- $name: ${took} s"
  if ((rc != 0)); then
    printf '%s\n' "${TIMES[@]}"
    die "$name failed (exit $rc)"
  fi
}

# The source as a checkout has it (tracked files, and new files git does not ignore), copied out of the repository:
# an in-tree build would leave build/ here, whose stale files can end up in later wheels.
copy_source() {
  mkdir -p "$TMP/src"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -cf - | tar -xf - -C "$TMP/src"
}

build_wheel() {
  "$BUILD_PYTHON" -m pip wheel --no-deps -q -w "$TMP/dist" "$TMP/src"
  local wheel
  wheel=$(echo "$TMP"/dist/mcti_jax-*.whl)
  [[ -f $wheel ]] || die "no wheel in $TMP/dist"
  echo "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB"
}

# Every file below mcti_jax/ in the source (code, configs, assets) must be in the wheel.
check_wheel() {
  "$BUILD_PYTHON" - "$WHEEL" "$TMP/src" <<'EOF'
import pathlib, sys, zipfile
wheel, src = sys.argv[1], pathlib.Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = sorted(p.relative_to(src).as_posix() for p in (src / "mcti_jax").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
missing = [f for f in want if f not in names]
for f in missing:
  print(f"  missing from the wheel: {f}")
for f in ("mcti_jax/configs/mcti.py", "mcti_jax/configs/demo.py", "mcti_jax/assets/tiny/sd/unet/config.json"):
  if f not in names:
    print(f"  missing from the wheel: {f}")
    missing.append(f)
assets = [f for f in names if f.startswith("mcti_jax/assets/")]
print(f"{len(names)} files in the wheel, {len(assets)} of them assets; {len(want)} below mcti_jax/ in the source")
sys.exit(1 if missing else 0)
EOF
}

make_venv() {
  "$SMOKE_PYTHON" -m venv "$TMP/venv"
  "$VPY" -c 'import sys; print(sys.executable, sys.version)'
}

install_wheel() {
  "$VPY" -m pip install -q "$WHEEL"
  "$VPY" -m pip check
  "$VPY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
}

# From a folder outside the repository, with nothing of it on the path, and no network for the hub (the demo needs
# none).
in_work() {
  mkdir -p "$TMP/work"
  (cd "$TMP/work" && env -u PYTHONPATH JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 PATH="$TMP/venv/bin:$PATH" "$@")
}

imported_from_venv() {
  in_work "$VPY" -c '
import sys, mcti_jax
where = mcti_jax.__file__
print(where)
sys.exit(not where.startswith(sys.prefix))'
}

no_heavy_packages() {
  in_work "$VPY" -c '
import importlib.util, sys
found = [m for m in ("torch", "tensorflow") if importlib.util.find_spec(m) is not None]
print("installed but not a runtime dependency:", ", ".join(found) if found else "none")
sys.exit(bool(found))'
}

quick_demo() {
  in_work "$MCTI" demo --config demo:quick --config.workdir="$TMP/demo" --config.evals.dic_fewshot.max_images=10
  for f in report.md results.json; do
    [[ -f $TMP/demo/$f ]] || die "the demo wrote no $f in $TMP/demo"
  done
}

step "copy the source" copy_source
step "build the wheel" build_wheel
WHEEL=$(echo "$TMP"/dist/mcti_jax-*.whl)
step "check the wheel's files" check_wheel
step "fresh venv" make_venv
step "pip install the wheel" install_wheel
step "imported from the venv" imported_from_venv
step "no torch, no tensorflow" no_heavy_packages
step "mcti --help" in_work "$MCTI" --help
step "mcti train --config mcti:tiny --help" in_work "$MCTI" train --config mcti:tiny --help
step "mcti demo --config demo:quick" quick_demo
echo "=== wheel smoke test passed"
printf '%s\n' "${TIMES[@]}"
