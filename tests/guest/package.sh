#!/bin/bash
# The Debian package as an operator runs it, in a guest under real systemd: dpkg -i, the
# service runs with its hardening, answers status and flush, stops clean (nothing left
# attached), and a restart keeps the spool and continues the sequence.
set -euo pipefail
P=/payload
fail() { echo "package: FAIL: $*"; journalctl -u sockacct --no-pager | tail -40; exit 1; }
step() { echo "package: $*"; }
wait_for() { # what, seconds, command...
    local what=$1 secs=$2; shift 2
    for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "timed out after ${secs}s waiting for $what"
}
attached() { bpftool cgroup tree /sys/fs/cgroup 2>/dev/null | grep -c sockacct || true; }

# A receiver for `sockacct flush`: every POST is acknowledged and kept.
mkdir -p /tmp/ingest
cat >/tmp/ingest.py <<'PY'
import http.server, os, sys
n = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global n
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n += 1
        open(f"/tmp/ingest/{n:04d}.zst", "wb").write(body)
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 18088), H).serve_forever()
PY
python3 /tmp/ingest.py &
INGEST=$!
trap 'kill $INGEST 2>/dev/null || true' EXIT

step "dpkg -i"
dpkg -i "$P/sockacct.deb"
[ -x /usr/sbin/sockacct ] || fail "no /usr/sbin/sockacct"
[ -f /etc/sockacct/config.toml ] || fail "no /etc/sockacct/config.toml"
printf '\n[upload]\nurl = "http://127.0.0.1:18088/ingest"\n' >>/etc/sockacct/config.toml
systemctl restart sockacct
wait_for "the control socket" 60 sockacct status
systemctl is-active --quiet sockacct || fail "service not active"
[ "$(systemctl show -p ProtectSystem --value sockacct)" = strict ] || fail "ProtectSystem is not strict"
[ "$(systemctl show -p NoNewPrivileges --value sockacct)" = yes ] || fail "NoNewPrivileges is off"
st=$(sockacct status)
echo "$st" | jq -c '{ok, kernel, hooks: [.hooks[] | {purpose, program}]}'
echo "$st" | jq -e '.ok == true and (.hooks | length) > 0' >/dev/null || fail "status: $st"
[ "$(attached)" -ge 4 ] || fail "fewer than 4 programs attached to the cgroup root: $(bpftool cgroup tree /sys/fs/cgroup)"

step "traffic, then flush"
python3 - <<'PY'
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50): s.sendto(b"x" * 500, r.getsockname())
PY
sleep_ticks() { local t0; t0=$(sockacct status | jq '.ticks // 0'); wait_for "$1 ticks" 30 sh -c "[ \$(sockacct status | jq '.ticks // 0') -ge $((t0 + $1)) ]"; }
udp() { python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(b'y'*100, ('127.0.0.1', 9)) for _ in range($1)]"; }
wait_for "an event" 30 sh -c 'sockacct status | jq -e ".events > 0"'
sleep_ticks 3
sockacct flush | tee /tmp/flush.json
jq -e '.ok == true' /tmp/flush.json >/dev/null || fail "flush: $(cat /tmp/flush.json)"
ls /tmp/ingest/*.zst >/dev/null 2>&1 || fail "flush uploaded nothing"
zstd -dc /tmp/ingest/*.zst | jq -e -s 'map(select(.type == "delta")) | length > 0' >/dev/null || fail "no delta record uploaded"
zstd -dc /tmp/ingest/*.zst | jq -e -s 'map(select(.type == "delta") | .labels["python3"].tx // 0) | add >= 50 * 528' >/dev/null \
    || fail "python3's 50 x (500 + 8 + 20) B are not in the upload"

step "stop: everything detached"
udp 10
sleep_ticks 3
systemctl stop sockacct
[ "$(attached)" = 0 ] || fail "programs still attached after stop: $(bpftool cgroup tree /sys/fs/cgroup)"
bpftool prog show 2>/dev/null | grep -q sockacct && fail "sockacct programs still loaded after stop"
last=$(sockacct spool cat --spool-dir /var/lib/sockacct/spool 2>/dev/null | jq -s 'map(.seq) | max')
[ "$last" != null ] || fail "the spool holds nothing after stop"

step "restart: spool kept, sequence continues after $last"
systemctl start sockacct
wait_for "the control socket" 60 sockacct status
udp 10
sleep_ticks 3
systemctl stop sockacct
seqs=$(sockacct spool cat --spool-dir /var/lib/sockacct/spool 2>/dev/null | jq -s 'map(.seq)')
echo "$seqs" | jq -e --argjson last "$last" 'map(select(. > $last)) | length > 0' >/dev/null || fail "no record after seq $last: $seqs"
echo "$seqs" | jq -e '(. | length) == (. | unique | length)' >/dev/null || fail "a sequence number repeats: $seqs"
step "ok"
