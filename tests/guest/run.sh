#!/bin/bash
# Runs inside a kernel-matrix guest (see xtask/src/vm.rs): the integration tests listed in
# tests.list against the guest's kernel, then, when the payload carries the Debian
# package, the service test. Results (logs, status) go to the directory given as $1.
set -uo pipefail
R="$1"
P=/payload
cd "$P"
export SOCKACCT_EXPECT_HOOKS="$(cat expect-hooks 2>/dev/null)"
export RUST_BACKTRACE=1
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "guest: $(uname -r), lockdown: $(cat /sys/kernel/security/lockdown 2>/dev/null || echo n/a)"
echo "guest: expecting hooks: ${SOCKACCT_EXPECT_HOOKS:-(any)}"

rc=0
bin/sockacct-agent check --iface lo >"$R/check.txt" 2>&1 || rc=1
cat "$R/check.txt"
while read -r test filters; do
    [ -n "$test" ] || continue
    echo "=== $test $filters"
    # shellcheck disable=SC2086 # filters are words
    "bin/deps/$test" --test-threads=1 $filters 2>&1 | tee "$R/$test.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done <tests.list

if [ -f sockacct.deb ]; then
    echo "=== package"
    bash package.sh 2>&1 | tee "$R/package.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
