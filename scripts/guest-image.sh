#!/usr/bin/env bash
# Prepares a QEMU guest for the kernel matrix: Debian's stock kernel of one series and a
# small Debian 12 root file system with that kernel's modules and an initramfs.
#
#   scripts/guest-image.sh SERIES      SERIES = 5.10 | 6.1 | 6.12
#
# Prints two lines on success:  KERNEL=<path to vmlinuz>  IMAGE=<path to rootfs.img>
# Everything is cached under $SOCKACCT_GUEST_CACHE (default /var/cache/sockacct-guests),
# outside the repository and keyed by the kernel package's version, so a reused machine
# skips the downloads and builds. The machine's own apt sources are never touched: the
# extra suites live in a private apt state under the cache.
set -euo pipefail

SERIES="${1:?usage: guest-image.sh 5.10|6.1|6.12}"
CACHE="${SOCKACCT_GUEST_CACHE:-/var/cache/sockacct-guests}"
MIRROR="${SOCKACCT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Bump when the guest's packages or its boot service change: rebuilds base and images.
ROOTFS_REV=5

log() { echo "guest-image: $*" >&2; }

case "$SERIES" in
    5.10) SUITE=bullseye; PATTERN='^linux-image-5\.10\.0-[0-9]+-amd64$' ;;
    6.1) SUITE=bookworm; PATTERN='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
    6.12) SUITE=trixie; PATTERN='^linux-image-6\.12\.[0-9]+\+deb13-amd64$' ;;
    *) echo "guest-image: unknown kernel series $SERIES (known: 5.10 6.1 6.12)" >&2; exit 2 ;;
esac

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- private apt state
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
for s in bullseye bookworm bookworm-backports trixie; do
    echo "deb [signed-by=$KEYRING] $MIRROR $s main"
done >"$APT/sources"
apt_q() {
    apt-get -q -o Dir::Etc::sourcelist="$APT/sources" -o Dir::Etc::sourceparts=/nonexistent \
        -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" \
        -o Dir::State::status=/var/lib/dpkg/status -o APT::Sandbox::User=root "$@"
}
apt_cache() {
    apt-cache -o Dir::Etc::sourcelist="$APT/sources" -o Dir::Etc::sourceparts=/nonexistent \
        -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" "$@"
}
# Refresh the index at most once a day; a machine without the network uses what it has.
stamp="$APT/updated"
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
    if apt_q update >"$APT/update.log" 2>&1; then
        touch "$stamp"
    else
        log "apt update failed (see $APT/update.log); using the cached index and kernels"
    fi
fi

# ---------------------------------------------------------------- the kernel
pkg=""
if [ -f "$APT/updated" ]; then
    # The newest package of the series in its suite (names carry the ABI number).
    pkg=$(apt_cache pkgnames linux-image- 2>/dev/null | grep -E "$PATTERN" | sort -V | tail -n1 || true)
fi
if [ -n "$pkg" ]; then
    ver=$(apt_cache madison "$pkg" | awk -v s="$SUITE" '$0 ~ s {print $3; exit}')
    [ -n "$ver" ] || ver=$(apt_cache madison "$pkg" | awk '{print $3; exit}')
    key="$pkg=$ver"
else
    # Offline: the newest kernel of this series already in the cache.
    key=$(ls -1 "$CACHE/kernels" 2>/dev/null | grep -E "^linux-image-${SERIES//./\\.}[.0-9-]" | sort -V | tail -n1 || true)
    [ -n "$key" ] || { log "no kernel package for $SERIES found (apt index empty, nothing cached)"; exit 1; }
fi
KDIR="$CACHE/kernels/$key"
if [ ! -f "$KDIR/done" ]; then
    log "downloading $key"
    rm -rf "$KDIR"; mkdir -p "$KDIR/x"
    (cd "$KDIR" && apt_q download "$key" >/dev/null)
    dpkg-deb -x "$KDIR"/*.deb "$KDIR/x"
    rm -f "$KDIR"/*.deb
    touch "$KDIR/done"
fi
# trixie's packages ship /usr/lib/modules (merged /usr), older ones /lib/modules.
MODS="$KDIR/x/lib/modules"
[ -d "$MODS" ] || MODS="$KDIR/x/usr/lib/modules"
KVER=$(ls "$MODS" | head -n1)
VMLINUZ="$KDIR/x/boot/vmlinuz-$KVER"

# ---------------------------------------------------------------- the base root fs
BASE="$CACHE/base-bookworm-r$ROOTFS_REV"
if [ ! -f "$BASE.done" ]; then
    log "debootstrap bookworm into $BASE (about a minute)"
    rm -rf "$BASE"
    debootstrap --variant=minbase --keyring="$KEYRING" \
        --include=iproute2,procps,python3,zstd,jq,systemd-sysv,kmod,util-linux,initramfs-tools,udev,bpftool,ca-certificates \
        bookworm "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        { log "debootstrap failed, see $CACHE/debootstrap.log"; exit 1; }
    echo sockacct-guest >"$BASE/etc/hostname"
    # Root without a password on the serial console, for looking at a guest by hand.
    chroot "$BASE" passwd -d root >/dev/null
    printf '/dev/vda / ext4 rw 0 1\nbpffs /sys/fs/bpf bpf defaults 0 0\n' >"$BASE/etc/fstab"
    # The payload runner: reads a tar from /dev/vdb, runs its run.sh, writes /results as a
    # tar to /dev/vdc, powers off. Output also goes to the serial console.
    cat >"$BASE/usr/local/sbin/sockacct-guest-run" <<'EOF'
#!/bin/bash
exec > >(tee /dev/ttyS0) 2>&1
mkdir -p /payload /results
cd /payload && tar xf /dev/vdb
echo "guest: kernel $(uname -r), payload unpacked"
rc=0
timeout "${GUEST_TIMEOUT:-1500}" bash /payload/run.sh /results || rc=$?
echo "$rc" >/results/rc
echo "guest: payload finished with status $rc"
sync
tar cf /dev/vdc -C /results .
sync
echo o >/proc/sysrq-trigger
EOF
    chmod +x "$BASE/usr/local/sbin/sockacct-guest-run"
    cat >"$BASE/etc/systemd/system/sockacct-guest.service" <<'EOF'
[Unit]
Description=Run the sockacct test payload and power off
After=local-fs.target systemd-modules-load.service
ConditionPathExists=/dev/vdb

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sockacct-guest-run
StandardOutput=journal
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
    chroot "$BASE" systemctl enable sockacct-guest.service >/dev/null 2>&1
    # Nothing in the guest should wait for a network that does not exist.
    chroot "$BASE" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
    # The serial console is the payload's: no login prompt over its output.
    chroot "$BASE" systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1 || true
    printf 'MODULES=list\nCOMPRESS=zstd\n' >"$BASE/etc/initramfs-tools/conf.d/sockacct"
    printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >>"$BASE/etc/initramfs-tools/modules"
    rm -rf "$BASE/var/cache/apt/archives"/*.deb "$BASE/var/lib/apt/lists"/*_Packages
    touch "$BASE.done"
fi

# ---------------------------------------------------------------- the image for this kernel
IMG="$CACHE/images/$key-r$ROOTFS_REV"
if [ ! -f "$IMG/done" ]; then
    log "building the root image for $KVER"
    rm -rf "$IMG"; mkdir -p "$IMG"
    ROOT="$IMG/root"
    cp -a "$BASE" "$ROOT"
    mkdir -p "$ROOT/usr/lib/modules" "$ROOT/boot"
    cp -a "$MODS/$KVER" "$ROOT/usr/lib/modules/"
    cp "$KDIR/x/boot/config-$KVER" "$ROOT/boot/"
    chroot "$ROOT" depmod -a "$KVER"
    chroot "$ROOT" update-initramfs -c -k "$KVER" >"$IMG/initramfs.log" 2>&1 ||
        { log "update-initramfs failed, see $IMG/initramfs.log"; exit 1; }
    mv "$ROOT/boot/initrd.img-$KVER" "$IMG/initrd.img"
    mkfs.ext4 -q -F -L root -d "$ROOT" "$IMG/rootfs.img" 2G
    rm -rf "$ROOT"
    touch "$IMG/done"
fi

echo "KERNEL=$VMLINUZ"
echo "INITRD=$IMG/initrd.img"
echo "IMAGE=$IMG/rootfs.img"
echo "KVER=$KVER"
