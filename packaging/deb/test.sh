#!/usr/bin/env bash
# Install-tests $DIST/ehrsync_$VERSION-1_amd64.deb in a throwaway Debian 12 root (debootstrap),
# never on this host: lintian; install (user, files, modes, the unit not enabled or started,
# the binary runs, check-config on the shipped example with its placeholders filled, the
# installed unit through systemd-analyze verify and security); an upgrade to a rebuilt package
# with a changed conffile keeps the operator's edit; remove keeps config and data; purge
# deletes them. Run by .ci/package-test from the repository's root, with VERSION and DIST set.
# The Debian root is built once and kept in ~/.cache/ehrsync-ci (EHRSYNC_CI_CACHE).
set -euo pipefail
: "${VERSION:?}" "${DIST:?}"
MAX_EXPOSURE=1.5
deb=$(realpath "$DIST/ehrsync_${VERSION}-1_amd64.deb")
cache=${EHRSYNC_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ehrsync-ci}
# What the package depends on, preinstalled (dpkg -i installs no dependencies).
include=systemd,init-system-helpers,procps,ca-certificates
base=$cache/debian-bookworm-minbase-${include//,/-}.tar

. .ci/lib.sh   # run from the repository root
missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }

echo "== lintian"
# Errors fail the build; warnings and notes are shown (overrides, each with its reason, are in
# packaging/deb/lintian-overrides).
lintian --fail-on error --display-info --tag-display-limit 0 "$deb" || fail "lintian found errors"
ok "lintian: no errors"

tmp=$(mktemp -d)
root=$tmp/root
cleanup() {
  as_root umount "$root/proc" 2>/dev/null || true
  as_root rm -rf "$tmp"
}
trap cleanup EXIT

echo "== a throwaway Debian 12 root"
if [ ! -s "$base" ]; then
  mkdir -p "$cache"
  as_root debootstrap --variant=minbase --include="$include" \
    bookworm "$tmp/build" http://deb.debian.org/debian >/dev/null
  as_root chroot "$tmp/build" apt-get clean
  as_root tar -C "$tmp/build" -cf "$base.part" .
  as_root mv "$base.part" "$base"
  as_root rm -rf "$tmp/build"
fi
mkdir "$root"
as_root tar -C "$root" -xf "$base"
as_root mount -t proc proc "$root/proc"
in_root() { as_root chroot "$root" "$@"; }
cp "$deb" "$root/tmp/ehrsync.deb"
ok "$(in_root sh -c '. /etc/os-release; echo "$PRETTY_NAME"'), $(in_root systemd --version | head -n1)"

echo "== install"
in_root dpkg -i /tmp/ehrsync.deb > "$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; fail "dpkg -i"; }
grep -q 'ehrsync is installed but not started' "$tmp/install.log" || { cat "$tmp/install.log"; fail "no post-install message"; }
ok "dpkg -i, with the post-install message"
version=$(in_root /usr/bin/ehrsync --version)
[[ $version == "ehrsync $VERSION (commit "* ]] || fail "--version: $version"
ok "/usr/bin/ehrsync --version: $version"
passwd=$(in_root getent passwd ehrsync) || fail "no user ehrsync"
IFS=: read -r _ _ uid _ _ home shell <<< "$passwd"
if [ "$uid" -ge 1000 ] || [ "$home" != /var/lib/ehrsync ] || [ "$shell" != /usr/sbin/nologin ]; then
  fail "user ehrsync: $passwd"
fi
ok "system user: $passwd"
check_mode() { # PATH MODE OWNER:GROUP
  local got
  got=$(in_root stat -c '%a %U:%G' "$1") || fail "$1 is missing"
  [ "$got" = "$2 $3" ] || fail "$1 is $got, want $2 $3"
  ok "$1 $got"
}
check_mode /usr/bin/ehrsync 755 root:root
check_mode /etc/ehrsync/ehrsync.toml 640 root:ehrsync
check_mode /etc/ehrsync/credentials 700 root:root
check_mode /var/lib/ehrsync 700 ehrsync:ehrsync
check_mode /lib/systemd/system/ehrsync.service 644 root:root
check_mode /usr/lib/sysusers.d/ehrsync.conf 644 root:root
check_mode /usr/share/ehrsync/prometheus/alerts.yml 644 root:root
check_mode /usr/share/ehrsync/views/patient_demographics.json 644 root:root
in_root test -f /usr/share/doc/ehrsync/copyright || fail "no copyright file"
in_root grep -q '^/etc/ehrsync/ehrsync.toml$' /var/lib/dpkg/info/ehrsync.conffiles \
  || fail "ehrsync.toml is not a conffile"
ok "/etc/ehrsync/ehrsync.toml is a conffile"
if in_root sh -c 'ls /etc/systemd/system/*.wants/ehrsync.service' >/dev/null 2>&1; then
  fail "the service was enabled at install"
fi
ok "the service is not enabled (nor started: no systemd runs in this root, and nothing tried)"

echo "== the shipped example config, placeholders filled"
# As the README's first account does it: the secrets an operator would put in credentials and
# the environment, check-config run as the service user.
in_root install -d -m 0700 -o ehrsync /tmp/creds
in_root sh -c 'printf placeholder-niko-secret > /tmp/creds/niko-secret; chown ehrsync /tmp/creds/niko-secret; chmod 600 /tmp/creds/niko-secret'
filled=(CREDENTIALS_DIRECTORY=/tmp/creds NEXTECH_CLIENT_SECRET=a NEXTECH_PASSWORD=b CC_SECRET=c CC_PASSWORD=d)
in_root runuser -u ehrsync -- env "${filled[@]}" ehrsync --config /etc/ehrsync/ehrsync.toml check-config \
  > "$tmp/check.log" 2>&1 || { cat "$tmp/check.log"; fail "check-config on the shipped example"; }
ok "check-config exits 0 on /etc/ehrsync/ehrsync.toml"
set +e
in_root runuser -u ehrsync -- ehrsync --config /etc/ehrsync/ehrsync.toml check-config > "$tmp/check.log" 2>&1
rc=$?
set -e
[ "$rc" -eq 2 ] || { cat "$tmp/check.log"; fail "check-config without the secrets exited $rc, want 2"; }
ok "check-config without its secrets exits 2: $(grep -m1 -o 'NEXTECH_CLIENT_SECRET[^.]*' "$tmp/check.log" || head -n1 "$tmp/check.log")"

echo "== the installed unit"
verify=$(in_root systemd-analyze verify /lib/systemd/system/ehrsync.service 2>&1) || true
[ -z "$verify" ] || { echo "$verify"; fail "systemd-analyze verify reported problems"; }
ok "systemd-analyze verify: clean"
security=$(in_root systemd-analyze security --offline=true --no-pager /lib/systemd/system/ehrsync.service 2>&1) || true
score=$(sed -n 's/.*Overall exposure level for ehrsync\.service: \([0-9][0-9.]*\).*/\1/p' <<< "$security")
[ -n "$score" ] || { echo "$security"; fail "no exposure score"; }
awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' || fail "exposure $score > $MAX_EXPOSURE"
ok "systemd-analyze security: exposure $score (at most $MAX_EXPOSURE)"

echo "== upgrade to a rebuilt package whose conffile changed"
# The operator's edit, and state the agent would have written.
in_root sh -c 'echo "# edited by the operator" >> /etc/ehrsync/ehrsync.toml'
in_root sh -c 'echo state > /var/lib/ehrsync/ehrsync.db; chown ehrsync:ehrsync /var/lib/ehrsync/ehrsync.db'
# The same package as revision 2, with one more line in the shipped example config.
as_root dpkg-deb -R "$deb" "$tmp/next"
as_root sh -c "echo '# a new example line in the next release' >> '$tmp/next/etc/ehrsync/ehrsync.toml'"
as_root sed -i "s/^Version: .*/Version: ${VERSION}-2/" "$tmp/next/DEBIAN/control"
(cd "$tmp/next" && as_root sh -c 'find . -path ./DEBIAN -prune -o -type f -print0 | sort -z | xargs -0 md5sum | sed "s#  \./#  #" > DEBIAN/md5sums')
as_root dpkg-deb --root-owner-group -b "$tmp/next" "$root/tmp/ehrsync-next.deb" >/dev/null
# --force-confold: what an unattended upgrade does when both sides changed the file.
in_root dpkg -i --force-confold /tmp/ehrsync-next.deb > "$tmp/upgrade.log" 2>&1 || { cat "$tmp/upgrade.log"; fail "upgrade"; }
[ "$(in_root dpkg-query -W -f '${Version}' ehrsync)" = "${VERSION}-2" ] || fail "not upgraded"
in_root grep -q '^# edited by the operator$' /etc/ehrsync/ehrsync.toml || fail "the operator's edit was lost"
in_root grep -q 'a new example line' /etc/ehrsync/ehrsync.toml.dpkg-dist || fail "no ehrsync.toml.dpkg-dist"
ok "the operator's edit survived; the new example is ehrsync.toml.dpkg-dist"
check_mode /etc/ehrsync/ehrsync.toml 640 root:ehrsync
[ "$(in_root cat /var/lib/ehrsync/ehrsync.db)" = state ] || fail "the database changed"
ok "the database is untouched"
if grep -q 'ehrsync is installed but not started' "$tmp/upgrade.log"; then
  fail "the upgrade printed the first-install message"
fi

echo "== remove keeps the config and the data"
in_root dpkg -r ehrsync > "$tmp/remove.log" 2>&1 || { cat "$tmp/remove.log"; fail "dpkg -r"; }
in_root test ! -e /usr/bin/ehrsync || fail "the binary is still there"
in_root test ! -e /lib/systemd/system/ehrsync.service || fail "the unit is still there"
in_root test -f /etc/ehrsync/ehrsync.toml || fail "remove deleted the config"
[ "$(in_root cat /var/lib/ehrsync/ehrsync.db)" = state ] || fail "remove deleted the database"
in_root getent passwd ehrsync >/dev/null || fail "remove deleted the user"
ok "binary and unit gone; config, database and user kept"

echo "== purge deletes them"
in_root dpkg -P ehrsync > "$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "dpkg -P"; }
in_root test ! -e /var/lib/ehrsync || fail "purge kept /var/lib/ehrsync"
in_root test ! -e /etc/ehrsync || fail "purge kept /etc/ehrsync: $(in_root ls -la /etc/ehrsync)"
ok "/var/lib/ehrsync and /etc/ehrsync gone (the system user stays, as Debian does)"
echo "deb: all checks passed"
