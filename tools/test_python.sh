#!/usr/bin/env bash
# The Python wheel, the Ray Data actor and `jv4 serve` (through the official openai client),
# tested on the CPU backend with a synthetic tiny model:
# a venv (target/pyenv) with pinned maturin / numpy / pytest / ray[data] / pillow / openai, the wheel built
# into the shared cargo target/ folder (it reuses the jv4 artifacts of `cargo build --release`:
# only PyO3 and the bindings compile), installed, and pytest over python/tests.
# Usage: bash tools/test_python.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

venv=target/pyenv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "maturin==1.16.0" "numpy==2.4.6" "pytest==9.2.0" "ray[data]==2.60.0" "pillow==13.0.0" "openai==3.51.0"
echo "test_python: venv ready ($((SECONDS - t0)) s)"

# The CLI the tests compare against (the Rust engine called directly); fresh after `cargo test --release`.
cargo build --release --bin jv4
rm -rf target/wheels
PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv" \
    maturin build --release -m python/Cargo.toml -o target/wheels
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels/jv4-*.whl
echo "test_python: wheel built and installed ($((SECONDS - t0)) s)"

# Run from the repository root with the pytest script (not `python -m`), so that python/jv4 (the
# sources, without the native module) does not shadow the installed package.
JV4_BIN="$PWD/target/release/jv4" "$venv/bin/pytest" -q -p no:cacheprovider --durations=5 python/tests "$@"
echo "test_python: done in $((SECONDS - t0)) s"
