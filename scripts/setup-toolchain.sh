#!/usr/bin/env bash
# Installs what building sockacct's kernel programs needs, idempotently:
#   - rust-src for the pinned nightly (for -Z build-std=core)
#   - bpf-linker 0.13.0 built against that nightly's own libLLVM 22
# bpf-linker is cached under $SOCKACCT_TOOLS_DIR (default /var/cache/sockacct-tools),
# outside the repository, so a reused machine skips the ~50 s build.
set -euo pipefail

TOOLS_DIR="${SOCKACCT_TOOLS_DIR:-/var/cache/sockacct-tools}"
NIGHTLY="${SOCKACCT_NIGHTLY:-nightly}"
BPF_LINKER_VERSION=0.13.0

if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
    echo "setup: rust toolchain '${NIGHTLY}' is missing (the eBPF crate needs it; see docs/toolchain.md)" >&2
    exit 1
fi

if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
    echo "setup: adding rust-src to $NIGHTLY"
    rustup component add rust-src --toolchain "$NIGHTLY"
fi

NL="$(rustc +"$NIGHTLY" --print sysroot)/lib"
SONAME="$(basename "$(ls "$NL"/libLLVM.so.*-rust-* | head -n1)")"
PREFIX="$TOOLS_DIR/llvm-prefix"
BIN="$TOOLS_DIR/bin/bpf-linker"
STAMP="$TOOLS_DIR/bpf-linker.stamp"
WANT="bpf-linker $BPF_LINKER_VERSION against $SONAME"

mkdir -p "$PREFIX/lib"
# The binary asks for the exact soname; the build looks for libLLVM.so.
ln -sf "$NL/$SONAME" "$PREFIX/lib/libLLVM.so"
ln -sf "$NL/$SONAME" "$PREFIX/lib/$SONAME"

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && \
   LD_LIBRARY_PATH="$PREFIX/lib" "$BIN" --version >/dev/null 2>&1; then
    echo "setup: $WANT cached at $BIN"
    exit 0
fi

echo "setup: building $WANT (about a minute on 2 cores)"
# Without LLVM_PREFIX the build finds Debian's LLVM 14 and fails; llvm-23 is the default feature.
LLVM_PREFIX="$PREFIX" cargo +stable install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22 --root "$TOOLS_DIR" --force
echo "$WANT" > "$STAMP"
echo "setup: bpf-linker installed at $BIN"
