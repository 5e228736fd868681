#!/bin/bash
# The Debian package as an operator runs it, in a guest under real systemd: dpkg -i, the
# service runs with its full sandbox (packaging/sockacct.service) and still counts exactly
# (cgroup and tc on lo), answers status and flush, serves /metrics, lets a [control] group
# member (not root) ask for status and label its own socket, stops clean (nothing left
# attached, stop record, run marker gone), cleans up after a SIGKILLed run's tc filters,
# and a restart keeps the spool and continues the sequence.
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
# Our tc filters on lo in one direction (netlink filters are named after the program).
tc_filters() { tc filter show dev lo "$1" 2>/dev/null | grep -c "sockacct_tc_$1" || true; }
# Program ids of our filters on lo, both directions.
tc_prog_ids() {
    for d in ingress egress; do tc filter show dev lo "$d"; done 2>/dev/null |
        grep sockacct_tc_ | grep -o ' id [0-9]*' | awk '{print $2}' | sort -n | tr '\n' ' '
}
clsact_on_lo() { tc qdisc show dev lo 2>/dev/null | grep -c clsact || true; }
spool() { sockacct spool cat --spool-dir /var/lib/sockacct/spool 2>/dev/null; }

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
# The shipped config as it is: postinst started the service.
wait_for "the control socket (shipped config)" 60 sockacct status
systemctl is-active --quiet sockacct || fail "service not active"

step "the sandbox, as systemd loaded it"
for kv in ProtectSystem=strict NoNewPrivileges=yes PrivateDevices=yes ProtectKernelTunables=yes \
    ProtectControlGroups=yes MemoryDenyWriteExecute=yes UMask=0077 LimitNOFILE=65536 \
    MemoryMax=536870912 ProtectProc=invisible; do
    got=$(systemctl show -p "${kv%%=*}" --value sockacct)
    [ "$got" = "${kv#*=}" ] || fail "${kv%%=*} is $got, not ${kv#*=}"
done
systemctl show -p SystemCallFilter --value sockacct | grep -qw pidfd_getfd || fail "SystemCallFilter lacks pidfd_getfd"
systemctl show -p CapabilityBoundingSet --value sockacct | grep -qw cap_chown || fail "no CAP_CHOWN"
systemd-analyze security --no-pager sockacct.service >/tmp/security.txt 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for sockacct.service: \([0-9.]*\).*/\1/p' /tmp/security.txt)
echo "package: systemd-analyze security sockacct.service: exposure ${exposure:-none}"
python3 -c "import sys; sys.exit(not (0 < float('$exposure') <= 3.5))" 2>/dev/null ||
    fail "exposure ${exposure:-none}, not at most 3.5: $(tail -5 /tmp/security.txt)"

step "configure: tc on lo, upload, [control] group = sockview"
groupadd --system sockview
useradd --no-create-home --shell /bin/sh --groups sockview viewer
useradd --no-create-home --shell /bin/sh outsider
# The unit as it was (no CAP_CHOWN): root alone cannot give the socket to the group.
mkdir -p /tmp/nochown && : >/tmp/nochown/empty.toml
if timeout 60 setpriv --bounding-set -chown sockacct run --config /tmp/nochown/empty.toml \
    --no-spool --no-metrics --state-dir /tmp/nochown --control-socket /tmp/nochown/ctl.sock \
    --control-group sockview >/tmp/nochown/out.txt 2>&1; then
    fail "the agent ran without CAP_CHOWN"
fi
grep -q "Operation not permitted" /tmp/nochown/out.txt ||
    fail "without CAP_CHOWN, not the expected EPERM: $(tail -3 /tmp/nochown/out.txt)"
echo "package: without CAP_CHOWN: $(grep -m1 "Operation not permitted" /tmp/nochown/out.txt)"
cat >/etc/sockacct/config.toml <<'TOML'
interfaces = ["lo"]

[upload]
url = "http://127.0.0.1:18088/ingest"

[control]
group = "sockview"
TOML
[ "$(clsact_on_lo)" = 0 ] || fail "lo has a clsact qdisc before the agent ran"
systemctl restart sockacct
wait_for "the control socket" 60 sockacct status
st=$(sockacct status)
echo "$st" | jq -c '{ok, kernel, hooks: [.hooks[] | {purpose, program}]}'
echo "$st" | jq -e '.ok == true and (.hooks | length) > 0' >/dev/null || fail "status: $st"
[ "$(attached)" -ge 4 ] || fail "fewer than 4 programs attached to the cgroup root: $(bpftool cgroup tree /sys/fs/cgroup)"
[ "$(tc_filters ingress)" = 1 ] && [ "$(tc_filters egress)" = 1 ] || fail "not one filter each way on lo: $(tc filter show dev lo ingress; tc filter show dev lo egress)"
[ "$(clsact_on_lo)" = 1 ] || fail "no clsact qdisc on lo"

step "control group: a member (not root) asks for status; others are refused"
[ "$(stat -c '%U:%G %a' /run/sockacct/control.sock)" = "root:sockview 660" ] ||
    fail "control socket is $(stat -c '%U:%G %a' /run/sockacct/control.sock), not root:sockview 660"
runuser -u viewer -- sockacct status | jq -e '.ok == true' >/dev/null || fail "group member's status failed"
runuser -u viewer -- sockacct flush >/tmp/viewer-flush.txt 2>&1 && fail "a group member could flush: $(cat /tmp/viewer-flush.txt)"
runuser -u outsider -- sockacct status >/dev/null 2>&1 && fail "a user outside the group got status"

step "traffic: udpprobe 50 x 500 B UDP to itself; viewer labels its own socket and sends 20 x 300 B"
cp /usr/bin/python3 /usr/local/bin/udpprobe # its own process name: its own label
udpprobe - <<'PY'
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50): s.sendto(b"x" * 500, r.getsockname())
for _ in range(50): assert len(r.recv(1000)) == 500
PY
# `label` from a process that did not create the socket but holds it (a forked child): the
# agent finds it among the child's descriptors (pidfd_open, pidfd_getfd), so the syscall
# filter must allow both.
runuser -u viewer -- python3 - <<'PY' || fail "the group member could not label its own socket"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cookie = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]  # SO_COOKIE
pid = os.fork()
if pid == 0:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect("/run/sockacct/control.sock")
    c.sendall(json.dumps({"cmd": "label", "cookie": cookie, "label": "viewer-probe"}).encode() + b"\n")
    reply = c.makefile().readline()
    print("package: label reply:", reply.strip(), flush=True)
    os._exit(0 if json.loads(reply).get("ok") else 1)
if os.waitpid(pid, 0)[1] != 0: sys.exit(1)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
for _ in range(20): s.sendto(b"v" * 300, r.getsockname())
PY
sleep_ticks() { local t0; t0=$(sockacct status | jq '.ticks // 0'); wait_for "$1 ticks" 30 sh -c "[ \$(sockacct status | jq '.ticks // 0') -ge $((t0 + $1)) ]"; }
udp() { python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(b'y'*100, ('127.0.0.1', 9)) for _ in range($1)]"; }
wait_for "an event" 30 sh -c 'sockacct status | jq -e ".events > 0"'
sleep_ticks 3

step "/metrics"
python3 - <<'PY' || fail "/metrics"
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9474/metrics", timeout=10).read().decode()
def value(name, **labels):
    for line in text.splitlines():
        m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == labels:
            return float(m.group(3))
want = {("udpprobe", "tx"): 50 * 528, ("udpprobe", "rx"): 50 * 528, ("viewer-probe", "tx"): 20 * 328}
for (label, d), n in want.items():
    got = value("sockacct_label_bytes_total", label=label, direction=d)
    print(f"package: metrics {label} {d} = {got}, want {n}")
    assert got == n, (label, d, got, n)
lo = value("sockacct_iface_bytes_total", iface="lo", direction="tx")
assert lo is not None and lo >= 50 * (528 + 14), lo  # tc on lo: + Ethernet header
PY

step "flush: exact bytes uploaded"
sockacct flush | tee /tmp/flush.json
jq -e '.ok == true' /tmp/flush.json >/dev/null || fail "flush: $(cat /tmp/flush.json)"
ls /tmp/ingest/*.zst >/dev/null 2>&1 || fail "flush uploaded nothing"
zstd -dc /tmp/ingest/*.zst >/tmp/uploaded.jsonl
sum() { jq -s "map(select(.type == \"delta\") | $1 // 0) | add" /tmp/uploaded.jsonl; }
for q in '.labels["udpprobe"].tx 26400' '.labels["udpprobe"].rx 26400' '.labels["viewer-probe"].tx 6560' \
    '.labels["viewer-probe"].rx 0'; do
    got=$(sum "${q% *}")
    [ "$got" = "${q##* }" ] || fail "${q% *}: uploaded $got, want ${q##* } (50 x (500+8+20), 20 x (300+8+20))"
done
# ProtectKernelTunables leaves /proc/sys readable: every record carries the real boot id
# (and the machine id as the agent's), not "unknown".
boot=$(cat /proc/sys/kernel/random/boot_id)
jq -e -s --arg b "$boot" 'length > 0 and all(.boot == $b)' /tmp/uploaded.jsonl >/dev/null ||
    fail "uploaded records do not all carry boot $boot: $(jq -c -s 'map(.boot) | unique' /tmp/uploaded.jsonl)"
if [ -s /etc/machine-id ]; then
    jq -e -s --arg a "$(cat /etc/machine-id)" 'all(.agent == $a)' /tmp/uploaded.jsonl >/dev/null ||
        fail "uploaded records do not carry the machine id as agent"
fi
jq -e -s 'map(select(.type == "delta")) | all(.total.tx == ((.labels | map(.tx) | add // 0) + (.unattributed.tx // 0)))' \
    /tmp/uploaded.jsonl >/dev/null || fail "an uploaded delta does not conserve tx"

echo "package: memory of the service (MemoryMax 512M): $(systemctl show -p MemoryCurrent --value sockacct) B"

step "stop: clean exit, everything detached, stop record, no run marker"
udp 10
sleep_ticks 3
systemctl stop sockacct
[ "$(systemctl show -p Result --value sockacct)" = success ] || fail "Result=$(systemctl show -p Result --value sockacct)"
[ "$(systemctl show -p ExecMainStatus --value sockacct)" = 0 ] || fail "exit status $(systemctl show -p ExecMainStatus --value sockacct)"
[ ! -e /var/lib/sockacct/running ] || fail "the run marker is still there after a clean stop"
[ "$(attached)" = 0 ] || fail "programs still attached after stop: $(bpftool cgroup tree /sys/fs/cgroup)"
bpftool prog show 2>/dev/null | grep -q sockacct && fail "sockacct programs still loaded after stop"
[ "$(tc_filters ingress)$(tc_filters egress)" = 00 ] || fail "tc filters left on lo: $(tc filter show dev lo ingress)"
[ "$(clsact_on_lo)" = 0 ] || fail "the clsact qdisc the agent added is still on lo"
spool | jq -e -s 'map(select(.type == "agent")) | last | .event == "stop"' >/dev/null ||
    fail "the last coverage record is not a stop: $(spool | jq -c -s 'map(select(.type == "agent")) | last')"
last=$(spool | jq -s 'map(.seq) | max')
[ "$last" != null ] || fail "the spool holds nothing after stop"

step "SIGKILL: systemd restarts it; the new run removes the killed run's tc filters and qdisc"
systemctl start sockacct
wait_for "the control socket" 60 sockacct status
pid1=$(systemctl show -p MainPID --value sockacct)
killed_ids=$(tc_prog_ids)
[ "$(echo $killed_ids | wc -w)" = 2 ] || fail "expected 2 program ids on lo before the kill: $killed_ids"
systemctl kill -s KILL sockacct
wait_for "a restart after SIGKILL" 60 sh -c \
    "p=\$(systemctl show -p MainPID --value sockacct); [ \"\$p\" != 0 ] && [ \"\$p\" != $pid1 ] && sockacct status"
[ "$(tc_filters ingress)" = 1 ] && [ "$(tc_filters egress)" = 1 ] ||
    fail "after a SIGKILL and restart, not exactly one filter each way on lo: $(tc filter show dev lo ingress; tc filter show dev lo egress)"
new_ids=$(tc_prog_ids)
for id in $killed_ids; do
    echo " $new_ids " | grep -q " $id " && fail "the killed run's program $id is still attached on lo (now: $new_ids)"
done
[ "$(echo $new_ids | wc -w)" = 2 ] || fail "the restarted run's filters are not on lo: $new_ids"
journalctl -u sockacct --no-pager | grep -m1 "removed what a killed run left attached" >/tmp/removed.txt ||
    fail "the restarted run did not say it removed the killed run's filters"
echo "package: killed run's programs $killed_ids; after restart $new_ids; $(sed 's/.*sockacct::loader[^ ]* //' /tmp/removed.txt)"
grep -q "2 tc filter(s), 1 clsact qdisc(s)" /tmp/removed.txt || fail "not 2 filters and 1 qdisc removed: $(cat /tmp/removed.txt)"
spool | jq -e -s 'map(select(.type == "agent")) | last | .event == "start" and .previous == "recovered"' >/dev/null ||
    fail "the restarted run does not say the previous one was recovered"
udp 10
sleep_ticks 3
systemctl stop sockacct
[ "$(tc_filters ingress)$(tc_filters egress)" = 00 ] || fail "tc filters left on lo after SIGKILL, restart, stop: $(tc filter show dev lo ingress)"
[ "$(clsact_on_lo)" = 0 ] || fail "clsact left on lo after SIGKILL, restart, stop"

step "restart: spool kept, sequence continues after $last"
systemctl start sockacct
wait_for "the control socket" 60 sockacct status
udp 10
sleep_ticks 3
systemctl stop sockacct
seqs=$(spool | jq -s 'map(.seq)')
echo "$seqs" | jq -e --argjson last "$last" 'map(select(. > $last)) | length > 0' >/dev/null || fail "no record after seq $last: $seqs"
echo "$seqs" | jq -e '(. | length) == (. | unique | length)' >/dev/null || fail "a sequence number repeats: $seqs"
# Whatever the sandbox refused would show as EPERM in the agent's warnings.
journalctl -u sockacct --no-pager -o cat | grep -E " (WARN|ERROR) " >/tmp/warns.txt || true
echo "package: the agent's warnings under the sandbox, all runs: $(wc -l </tmp/warns.txt)"
sed 's/^/package:   /' /tmp/warns.txt | head -20
grep -q "Operation not permitted" /tmp/warns.txt && fail "the sandbox refused the agent something"
step "ok"
