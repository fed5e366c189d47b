#!/usr/bin/env bash
# Install-tests $DIST/ehrsync-$VERSION-x86_64-linux-musl.tar.gz without touching this host's
# system (everything happens in temporary directories and chroots below them):
#   1. the archive: one top directory, the expected files, owner 0:0, fixed modes, one
#      timestamp (the commit's, or SOURCE_DATE_EPOCH); its files are the repository's; rebuilt
#      from the same inputs it is byte-identical;
#   2. the binary is static and runs in a bare root holding nothing but itself (no /lib, /usr,
#      /etc, /dev, /proc): --version, check-config on the example config with its secrets
#      filled in (exit 0), broken configs (exit 2), and `demo`, whose database gets patients
#      from the built-in sandbox on loopback;
#   3. install.sh --root into an empty directory (the user via systemd-sysusers --root): files,
#      modes, owners; the unit passes systemd-analyze verify; the service user can read the
#      config and write its state directory, others cannot; an upgrade keeps an edited config
#      (the example goes beside it), the data and the user, replaces the binary and saves a
#      hand-edited unit; uninstall keeps config, data and user; --purge removes them;
#   4. install.sh as root of a distribution without systemd or dpkg (a chroot with BusyBox and
#      either shadow's useradd or systemd-sysusers, and nothing else), then uninstall --purge.
# Usage (from .ci/package-test, after .ci/package): VERSION=0.1.0 DIST=target/dist bash
# packaging/tarball/test.sh. Needs root (chroot, chown); installs what it needs with apt.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)}
DIST=${DIST:-target/dist}
name=ehrsync-$VERSION-x86_64-linux-musl
archive=$DIST/$name.tar.gz
started=$SECONDS

section() { echo "== tarball test: $*"; }
pass() { echo "  ok  $*"; }
fail() { echo "tarball/test: FAIL: $*" >&2; exit 1; }
# limit SECONDS COMMAND...: no step may hang the test.
limit() { timeout --kill-after=5 "$@"; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=VERSION,DIST,SOURCE_DATE_EPOCH bash "$0" "$@"
  fi
  fail "needs root (chroot, files owned by other users)"
fi
[ -f "$archive" ] || fail "no $archive; build it first: bash .ci/package (or packaging/tarball/build.sh)"

section "tools"
missing=()
command -v file >/dev/null 2>&1 || missing+=(file)
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v systemd-sysusers >/dev/null 2>&1 || missing+=(systemd)
[ -x /bin/kill ] || missing+=(procps)       # the unit's ExecReload=, which verify checks
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
command -v strip >/dev/null 2>&1 || missing+=(binutils)   # build.sh, for the rebuild
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
CHROOT=$(command -v chroot)
# ehrsync's HTTP client needs CA certificates: without any it cannot be set up at all ("No CA
# certificates were loaded from the system"), not even for the demo's plain-HTTP sandbox. The
# chroots that run `demo` get this host's bundle.
ca_bundle=
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem \
  /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/ca-bundle.pem /etc/ssl/cert.pem; do
  if [ -s "$f" ]; then ca_bundle=$f; break; fi
done
[ -n "$ca_bundle" ] || fail "this host has no CA certificate bundle (apt-get install ca-certificates)"
# with_ca_bundle ROOT COMMAND...: run COMMAND with the host's CA bundle in ROOT/etc/ssl/certs,
# removed again afterwards (with the directories it needed).
with_ca_bundle() {
  local r=$1 rc=0 made=
  shift
  [ -d "$r/etc/ssl" ] || made=$r/etc/ssl
  [ -d "$r/etc" ] || made=$r/etc
  mkdir -p "$r/etc/ssl/certs"
  [ ! -e "$r/etc/ssl/certs/ca-certificates.crt" ] || fail "$r already has a CA bundle"
  cp "$ca_bundle" "$r/etc/ssl/certs/ca-certificates.crt"
  "$@" || rc=$?
  rm -f "$r/etc/ssl/certs/ca-certificates.crt"
  if [ -n "$made" ]; then rm -rf -- "$made"; fi
  return "$rc"
}

tmp=$(mktemp -d /tmp/ehrsync-tarball-test.XXXXXX)
chmod 0755 "$tmp"   # the unpacked tarball is read by an unprivileged user too
cleanup() {
  local rc=$?
  rm -rf -- "$tmp"
  if [ "$rc" -ne 0 ]; then echo "tarball/test: failed after $((SECONDS - started)) s" >&2; fi
}
trap cleanup EXIT

# A static BusyBox for the distribution chroots: the host's if static, else Debian's
# busybox-static package unpacked here (not installed: it would replace a busybox package).
busybox=
if command -v busybox >/dev/null 2>&1 \
  && file -L -b "$(command -v busybox)" | grep -Eq 'statically linked|static-pie linked'; then
  busybox=$(command -v busybox)
else
  (cd "$tmp" && { apt-get download -q busybox-static >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get download -q busybox-static >/dev/null; }; }) \
    || fail "cannot download Debian's busybox-static package"
  dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/busybox-static"
  busybox=$tmp/busybox-static/bin/busybox
fi
pass "file, sqlite3, systemd-analyze, systemd-sysusers, useradd, static busybox ($busybox)"

# --- 1. The archive --------------------------------------------------------------------------
section "the archive $archive"
gzip -t "$archive" || fail "$archive is not a valid gzip file"
pass "gzip integrity"

expected_files=(bin/ehrsync install.sh uninstall.sh systemd/ehrsync.service
  systemd/ehrsync.sysusers config/ehrsync.toml config/prometheus/alerts.yml
  config/prometheus/prometheus.yml config/views/patient_demographics.json
  config/views/patient_contacts.json config/views/appointments.json README.md LICENSE CHANGELOG.md)
shopt -s nullglob
for doc in docs/*.md docs/*.png; do expected_files+=("$doc"); done
shopt -u nullglob
# The repository file each archive file comes from (the binary is checked on its own).
source_of() {
  case $1 in
    install.sh | uninstall.sh) echo "packaging/tarball/$1" ;;
    *) echo "$1" ;;
  esac
}

diff <(printf '%s\n' "${expected_files[@]}" | sed "s|^|$name/|" | sort) \
  <(tar -tzf "$archive" | grep -v '/$' | sort) \
  || fail "the archive's files differ from the expected list (< expected, > archive)"
pass "${#expected_files[@]} files, as expected"
if tar -tzf "$archive" | grep -v "^$name/"; then
  fail "entries outside the top directory $name/ (above)"
fi
pass "one top directory $name/"

# Owner, mode, type and timestamp of every entry (tar -tv: mode owner size date time name).
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  epoch=$SOURCE_DATE_EPOCH
else
  epoch=$(git log -1 --format=%ct 2>/dev/null || true)
fi
stamp=
if [ -n "$epoch" ]; then stamp=$(date -u -d "@$epoch" '+%Y-%m-%d %H:%M:%S'); fi
bad=$(TZ=UTC tar --numeric-owner --full-time -tvzf "$archive" | awk -v top="$name/" -v stamp="$stamp" '
  {
    mode = $1; owner = $2; when = $4 " " $5; path = $6
    if (path ~ /\/$/) want = "drwxr-xr-x"
    else if (path == top "bin/ehrsync" || path == top "install.sh" || path == top "uninstall.sh") want = "-rwxr-xr-x"
    else want = "-rw-r--r--"
    if (mode != want) print path ": mode " mode ", expected " want
    if (owner != "0/0") print path ": owner " owner ", expected 0/0"
    if (first == "") first = when
    if (stamp != "" && when != stamp) print path ": dated " when ", expected " stamp
    if (stamp == "" && when != first) print path ": dated " when ", unlike " first
  }')
[ -z "$bad" ] || fail "archive entries with the wrong owner, mode or time (a wrong time: the archive
was built at another commit, or with another SOURCE_DATE_EPOCH; rebuild it):
$bad"
pass "owner 0:0, modes 0755 (dirs, bin/ehrsync, install.sh, uninstall.sh) and 0644, all dated ${stamp:-alike} UTC"

x=$tmp/x
mkdir "$x"
tar -xzf "$archive" -C "$x"
x=$x/$name
for f in "${expected_files[@]}"; do
  [ "$f" = bin/ehrsync ] && continue
  cmp -s "$x/$f" "$(source_of "$f")" || fail "$f in the archive differs from the repository's $(source_of "$f")"
done
pass "every file but the binary is the repository's (a stale archive would fail here)"

info=$(file -b "$x/bin/ehrsync")
case $info in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) fail "bin/ehrsync is not statically linked: $info" ;;
esac
case $info in
  *"not stripped"*) fail "bin/ehrsync is not stripped: $info" ;;
  *stripped*) ;;
  *) fail "file does not say whether bin/ehrsync is stripped: $info" ;;
esac
pass "bin/ehrsync: $info"

rebuild_out=$(limit 60 env SOURCE_DATE_EPOCH="${epoch:-0}" VERSION="$VERSION" DIST="$tmp/rebuilt" \
  LINUX_BIN="$x/bin/ehrsync" bash packaging/tarball/build.sh 2>&1) \
  || fail "build.sh failed to rebuild the archive from its own binary:
$rebuild_out"
if [ -n "$epoch" ]; then
  cmp -s "$archive" "$tmp/rebuilt/$name.tar.gz" \
    || fail "rebuilt from the same inputs, the archive differs: not reproducible"
  pass "rebuilt from the same binary, sources and time: byte-identical ($(sha256sum < "$archive" | cut -c1-16)…)"
fi

# The example config's secrets, filled with placeholders: each { env = "VAR" } becomes an
# environment variable, each { credential = "NAME" } a file in $CREDENTIALS_DIRECTORY.
example=$x/config/ehrsync.toml
# (Comment lines are left out: they show the syntax with made-up names.)
mapfile -t env_vars < <(grep -v '^[[:space:]]*#' "$example" | grep -o '{ *env *= *"[A-Za-z_][A-Za-z0-9_]*" *}' \
  | sed 's/.*"\(.*\)".*/\1/' | sort -u)
mapfile -t credentials < <(grep -v '^[[:space:]]*#' "$example" | grep -o '{ *credential *= *"[^"]*" *}' \
  | sed 's/.*"\(.*\)".*/\1/' | sort -u)
[ ${#env_vars[@]} -gt 0 ] || fail "found no { env = \"VAR\" } secrets in the example config"
[ ${#credentials[@]} -gt 0 ] || fail "found no { credential = \"NAME\" } secrets in the example config"
accounts=$(grep -c '^\[accounts\.[A-Za-z0-9_-]*\]$' "$example")
secret_env=()
for v in "${env_vars[@]}"; do secret_env+=("$v=placeholder-$v"); done
# make_credentials DIR OWNER: the credential files, as systemd would hand them to the service.
make_credentials() {
  mkdir -p "$1"
  chmod 0500 "$1"
  for c in "${credentials[@]}"; do
    printf 'placeholder-%s\n' "$c" > "$1/$c"
    chmod 0400 "$1/$c"
  done
  chown -R "$2" "$1"
}

# --- 2. A bare root: the binary and nothing else ---------------------------------------------
section "the binary in a bare root (no libraries, no /etc, /usr, /dev or /proc)"
bare=$tmp/bare
mkdir -m 0755 "$bare"
install -m 0755 "$x/bin/ehrsync" "$bare/ehrsync"
mkdir -m 1777 "$bare/tmp"
[ "$(cd "$bare" && find . -mindepth 1 | sort | tr '\n' ' ')" = "./ehrsync ./tmp " ] \
  || fail "the bare root holds more than /ehrsync and /tmp"
for d in lib lib64 usr etc dev proc; do
  [ ! -e "$bare/$d" ] || fail "the bare root has /$d"
done
# run_bare COMMAND...: the binary in the bare root, with an empty environment plus $bare_env.
bare_env=()
run_bare() { limit 60 env -i "${bare_env[@]}" "$CHROOT" "$bare" /ehrsync "$@"; }

out=$(run_bare --version) || fail "ehrsync --version failed in the bare root"
[[ $out =~ ^ehrsync\ ${VERSION//./\\.}\ \(commit\ [0-9a-f]{7,40}\)$ ]] \
  || fail "ehrsync --version printed '$out', expected 'ehrsync $VERSION (commit <hex>)'"
pass "chroot: $out"

cp "$example" "$bare/c.toml"
make_credentials "$bare/creds" 0:0
bare_env=("${secret_env[@]}" CREDENTIALS_DIRECTORY=/creds)
set +e
out=$(run_bare --config /c.toml check-config 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "check-config on the example config exited $rc:
$out"
grep -q "^OK: $accounts accounts" <<< "$out" \
  || fail "check-config did not report 'OK: $accounts accounts':
$out"
pass "chroot: check-config on the example config (${env_vars[*]} and credential ${credentials[*]} filled in): exit 0, $(grep '^OK:' <<< "$out")"

bare_env=("${secret_env[@]:1}" CREDENTIALS_DIRECTORY=/creds)
set +e
out=$(run_bare --config /c.toml check-config 2>&1); rc=$?
set -e
[ "$rc" -eq 2 ] || fail "check-config without ${env_vars[0]} exited $rc, expected 2:
$out"
grep -q "${env_vars[0]}" <<< "$out" || fail "check-config without ${env_vars[0]} does not name it:
$out"
pass "chroot: check-config without ${env_vars[0]}: exit 2, naming it"

cp "$example" "$bare/broken.toml"
printf '\n[agent\n' >> "$bare/broken.toml"
bare_env=("${secret_env[@]}" CREDENTIALS_DIRECTORY=/creds)
set +e
out=$(run_bare --config /broken.toml check-config 2>&1); rc=$?
set -e
[ "$rc" -eq 2 ] || fail "check-config on a config with a TOML syntax error exited $rc, expected 2:
$out"
pass "chroot: check-config on a TOML syntax error: exit 2"

# The built-in vendor sandbox listens on 127.0.0.1: a chroot shares the host's network. The
# demo gets /etc/ssl/certs/ca-certificates.crt for the run (see with_ca_bundle).
bare_env=()
set +e
out=$(with_ca_bundle "$bare" limit 90 env -i "$CHROOT" "$bare" /ehrsync demo --for 20s --dir /d 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "demo in the bare root exited $rc:
$out"
db=$bare/d/ehrsync-demo.db
[ -f "$db" ] || fail "demo left no database at /d/ehrsync-demo.db:
$out"
patients=$(sqlite3 -readonly "$db" 'SELECT count(*) FROM patients')
by_account=$(sqlite3 -readonly "$db" \
  "SELECT group_concat(account || ' ' || n, ', ') FROM (SELECT account, count(*) AS n FROM patients GROUP BY account ORDER BY account)")
[ "$patients" -gt 0 ] || fail "demo's database has no patients after 20 s:
$out"
pass "chroot: demo --for 20s pulled $patients patients from the loopback sandbox ($by_account)"

# --- Checks shared by the installs below ---------------------------------------------------------
# expect ROOT PATH TYPE MODE OWNER: stat of ROOT/PATH, owner numeric UID:GID.
expect() {
  local got
  got=$(stat -c '%F %a %u:%g' -- "$1$2" 2>/dev/null) || fail "$2 is missing in $1"
  [ "$got" = "$3 $4 $5" ] || fail "$2: $got, expected $3 $4 $5"
}
# user_ids ROOT: "UID GID" of ehrsync in ROOT/etc/passwd, checked: a system user (UID below
# 1000) with home /var/lib/ehrsync, no login shell, and its own group.
user_ids() {
  local line uid gid home shell group
  line=$(grep '^ehrsync:' "$1/etc/passwd") || fail "no user ehrsync in $1/etc/passwd"
  [ "$(grep -c '^ehrsync:' "$1/etc/passwd")" -eq 1 ] || fail "user ehrsync is in $1/etc/passwd twice"
  IFS=: read -r _ _ uid gid _ home shell <<< "$line"
  if [ "$uid" -le 0 ] || [ "$uid" -ge 1000 ]; then fail "ehrsync has UID $uid, not a system UID (1-999)"; fi
  [ "$home" = /var/lib/ehrsync ] || fail "ehrsync's home is $home, expected /var/lib/ehrsync"
  case $shell in */nologin | /bin/false) ;; *) fail "ehrsync's shell is $shell, expected nologin" ;; esac
  group=$(grep '^ehrsync:' "$1/etc/group") || fail "no group ehrsync in $1/etc/group"
  [ "$(cut -d: -f3 <<< "$group")" = "$gid" ] || fail "group ehrsync's GID is not ehrsync's primary GID $gid"
  echo "$uid $gid"
}
# check_installed ROOT UID GID: what a fresh install.sh leaves in ROOT.
check_installed() {
  local r=$1 uid=$2 gid=$3 f
  expect "$r" /usr/local/bin/ehrsync "regular file" 755 0:0
  cmp -s "$r/usr/local/bin/ehrsync" "$x/bin/ehrsync" || fail "/usr/local/bin/ehrsync is not the tarball's binary"
  expect "$r" /etc/systemd/system/ehrsync.service "regular file" 644 0:0
  cmp -s "$r/etc/systemd/system/ehrsync.service" "$x/systemd/ehrsync.service" || fail "the installed unit is not the tarball's"
  expect "$r" /usr/lib/sysusers.d/ehrsync.conf "regular file" 644 0:0
  cmp -s "$r/usr/lib/sysusers.d/ehrsync.conf" "$x/systemd/ehrsync.sysusers" || fail "the installed sysusers file is not the tarball's"
  expect "$r" /var/lib/ehrsync directory 700 "$uid:$gid"
  expect "$r" /etc/ehrsync directory 755 0:0
  expect "$r" /etc/ehrsync/ehrsync.toml "regular file" 640 "0:$gid"
  cmp -s "$r/etc/ehrsync/ehrsync.toml" "$x/config/ehrsync.toml" || fail "the installed config is not the example"
  [ ! -e "$r/etc/ehrsync/ehrsync.toml.example" ] || fail "a first install left ehrsync.toml.example beside the config"
  expect "$r" /etc/ehrsync/credentials directory 700 0:0
  expect "$r" /etc/credstore directory 700 0:0
  expect "$r" /etc/credstore.encrypted directory 700 0:0
  for f in patient_demographics.json patient_contacts.json appointments.json; do
    expect "$r" "/usr/local/share/ehrsync/views/$f" "regular file" 644 0:0
  done
  for f in alerts.yml prometheus.yml; do
    expect "$r" "/usr/local/share/ehrsync/prometheus/$f" "regular file" 644 0:0
    cmp -s "$r/usr/local/share/ehrsync/prometheus/$f" "$x/config/prometheus/$f" || fail "/usr/local/share/ehrsync/prometheus/$f is not the tarball's"
  done
  expect "$r" /usr/local/share/ehrsync/uninstall.sh "regular file" 755 0:0
  for f in README.md CHANGELOG.md LICENSE docs/operations.md docs/configuration.md; do
    expect "$r" "/usr/local/share/doc/ehrsync/$f" "regular file" 644 0:0
  done
  # Never enabled or started: no symlink in any .wants/ directory.
  if [ -d "$r/etc/systemd/system" ] && [ -n "$(find "$r/etc/systemd/system" -type l)" ]; then
    fail "install.sh enabled something: $(find "$r/etc/systemd/system" -type l)"
  fi
}
# check_service_user ROOT UID GID: as the service user, check-config reads the installed
# config (secrets as systemd would hand them over) and `demo` writes into /var/lib/ehrsync;
# another unprivileged user (nobody, 65534) can do neither.
check_service_user() {
  local r=$1 uid=$2 gid=$3 out rc
  make_credentials "$r/run/credentials/ehrsync.service" "$uid:$gid"
  local run=(limit 60 env -i "${secret_env[@]}" CREDENTIALS_DIRECTORY=/run/credentials/ehrsync.service
    "$CHROOT")
  set +e
  out=$("${run[@]}" --userspec="$uid:$gid" "$r" /usr/local/bin/ehrsync --config /etc/ehrsync/ehrsync.toml check-config 2>&1); rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "as user ehrsync, check-config on the installed config exited $rc:
$out"
  set +e
  out=$("${run[@]}" --userspec=65534:65534 "$r" /usr/local/bin/ehrsync --config /etc/ehrsync/ehrsync.toml check-config 2>&1); rc=$?
  set -e
  [ "$rc" -eq 2 ] || fail "as user nobody, check-config on the installed config exited $rc, expected 2 (unreadable):
$out"
  grep -qi 'permission denied' <<< "$out" || fail "as user nobody, check-config failed, but not for the config's permissions:
$out"
  pass "as user ehrsync ($uid:$gid) check-config reads /etc/ehrsync/ehrsync.toml: exit 0; as nobody: exit 2, permission denied"
  rm -rf -- "$r/run"
  set +e
  out=$(with_ca_bundle "$r" limit 60 env -i "$CHROOT" --userspec="$uid:$gid" "$r" /usr/local/bin/ehrsync demo --for 2s --dir /var/lib/ehrsync/demo 2>&1); rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "as user ehrsync, demo --dir /var/lib/ehrsync/demo exited $rc:
$out"
  expect "$r" /var/lib/ehrsync/demo/ehrsync-demo.db "regular file" 600 "$uid:$gid"
  set +e
  out=$(with_ca_bundle "$r" limit 60 env -i "$CHROOT" --userspec=65534:65534 "$r" /usr/local/bin/ehrsync demo --for 1s --dir /var/lib/ehrsync/nobody 2>&1); rc=$?
  set -e
  [ "$rc" -ne 0 ] || fail "as user nobody, demo could write into /var/lib/ehrsync"
  grep -qi 'permission denied' <<< "$out" || fail "as user nobody, demo failed, but not for /var/lib/ehrsync's permissions:
$out"
  pass "as user ehrsync, demo writes its database into /var/lib/ehrsync (0600); nobody cannot"
}

# --- 3. install.sh --root into an empty directory --------------------------------------------
section "install.sh: help and refusals"
# expect_exit WANT PATTERN WHAT: the command just run (its $rc and $out) exited WANT, saying PATTERN.
expect_exit() {
  if [ "$rc" -ne "$1" ] || ! grep -q -- "$2" <<< "$out"; then
    fail "$3 exited $rc (expected $1, saying '$2'):
$out"
  fi
}
root=$tmp/root
mkdir "$root"
out=$(limit 10 sh "$x/install.sh" --help) || fail "install.sh --help failed"
grep -q -- '--root DIR' <<< "$out" || fail "install.sh --help does not describe --root"
out=$(limit 10 sh "$x/uninstall.sh" --help) || fail "uninstall.sh --help failed"
grep -q -- '--purge' <<< "$out" || fail "uninstall.sh --help does not describe --purge"
set +e
out=$(limit 10 sh "$x/install.sh" --root "$root" --bogus 2>&1); rc=$?
set -e
expect_exit 2 'unknown option --bogus' "install.sh --bogus"
set +e
out=$(limit 10 "$CHROOT" --userspec=65534:65534 / sh "$x/install.sh" --root "$root" 2>&1); rc=$?
set -e
expect_exit 1 'run it as root' "install.sh as a non-root user"
broken=$tmp/broken
cp -a "$x" "$broken"
rm "$broken/bin/ehrsync"
set +e
out=$(limit 10 sh "$broken/install.sh" --root "$root" 2>&1); rc=$?
set -e
expect_exit 1 'missing in .*bin/ehrsync' "install.sh without bin/ehrsync"
[ -z "$(ls -A "$root")" ] || fail "install.sh refused, but installed something: $(ls -A "$root")"
rm -rf -- "$broken"
pass "--help (both scripts); an unknown option: exit 2; not root: exit 1 \"run it as root\"; bin/ehrsync missing: exit 1 naming it, nothing installed"

section "install.sh --root DIR (user via systemd-sysusers --root)"
set +e
out=$(limit 60 sh "$x/install.sh" --root "$root" 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "install.sh --root exited $rc:
$out"
while IFS= read -r line; do echo "  | $line"; done <<< "$out"
for step in "check-config" "doctor" "systemctl enable --now ehrsync"; do
  grep -qF -- "$step" <<< "$out" || fail "install.sh's closing message does not mention '$step'"
done
pass "install.sh --root: exit 0; its next steps name check-config, doctor, systemctl enable --now ehrsync"
ids=$(user_ids "$root")
read -r uid gid <<< "$ids"
pass "user ehrsync in $root/etc/passwd: system UID $uid, group $gid, home /var/lib/ehrsync, no login shell"
check_installed "$root" "$uid" "$gid"
pass "files, modes and owners: binary 0755, unit and sysusers 0644, /var/lib/ehrsync 0700 ehrsync, /etc/ehrsync/ehrsync.toml 0640 root:ehrsync, credstores 0700 root, Prometheus files, docs; nothing enabled"

unit=$root/etc/systemd/system/ehrsync.service
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
read -r -a exec_args <<< "$exec_start"
[ -x "$root${exec_args[0]}" ] || fail "the unit's ExecStart=${exec_args[0]} is not where install.sh put the binary"
config_arg=
for ((i = 1; i < ${#exec_args[@]}; i++)); do
  if [ "${exec_args[i]}" = --config ]; then config_arg=${exec_args[i + 1]:-}; fi
done
if [ -z "$config_arg" ] || [ ! -f "$root$config_arg" ]; then
  fail "the unit's ExecStart=$exec_start names no installed --config"
fi
user=$(sed -n 's/^User=//p' "$unit")
grep -q "^$user:" "$root/etc/passwd" || fail "the unit's User=$user does not exist in $root/etc/passwd"
"$root${exec_args[0]}" "${exec_args[@]:1}" --help >/dev/null \
  || fail "the installed binary rejects the unit's ExecStart arguments: $exec_start"
pass "the unit runs ${exec_args[0]} (installed) with --config $config_arg (installed) as User=$user (created)"
# systemd-analyze verify --root would look for systemd's own units and /bin/kill in the root;
# as in .ci/systemd-check, the installed unit is verified as a copy whose ExecStart runs the
# installed binary by its path on this host.
mkdir "$tmp/verify"
sed "s|^ExecStart=${exec_args[0]} |ExecStart=$root${exec_args[0]} |" "$unit" > "$tmp/verify/ehrsync.service"
set +e
verify_out=$(cd "$tmp/verify" && limit 60 systemd-analyze verify ./ehrsync.service 2>&1); rc=$?
set -e
if [ "$rc" -ne 0 ] || [ -n "$verify_out" ]; then
  fail "systemd-analyze verify on the installed unit (exit $rc):
$verify_out"
fi
score=$(cd "$tmp/verify" && limit 60 systemd-analyze security --offline=true --no-pager ./ehrsync.service 2>&1 \
  | sed -n 's/.*Overall exposure level for ehrsync\.service: \([0-9][0-9.]*\).*/\1/p')
if [ -z "$score" ] || ! awk -v s="$score" 'BEGIN { exit !(s < 2.0) }'; then
  fail "systemd-analyze security scores the installed unit '${score:-no score}', expected below 2.0"
fi
pass "systemd-analyze verify: clean; security: exposure $score"
check_service_user "$root" "$uid" "$gid"

section "install.sh --root again: an upgrade"
conf=$root/etc/ehrsync/ehrsync.toml
printf '\n# edited by the operator %s\n' "$$" >> "$conf"
cp -p "$conf" "$tmp/edited.toml"
printf 'an older ehrsync\n' > "$root/usr/local/bin/ehrsync"
sed -i 's/^Description=.*/& (edited by hand)/' "$unit"
data_sum=$(sha256sum < "$root/var/lib/ehrsync/demo/ehrsync-demo.db")
set +e
out=$(limit 60 sh "$x/install.sh" --root "$root" 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "install.sh --root, run again, exited $rc:
$out"
cmp -s "$conf" "$tmp/edited.toml" || fail "the upgrade changed the edited /etc/ehrsync/ehrsync.toml"
expect "$root" /etc/ehrsync/ehrsync.toml "regular file" 640 "0:$gid"
expect "$root" /etc/ehrsync/ehrsync.toml.example "regular file" 644 0:0
cmp -s "$root/etc/ehrsync/ehrsync.toml.example" "$example" || fail "ehrsync.toml.example is not the tarball's example"
grep -q 'ehrsync.toml.example' <<< "$out" || fail "install.sh does not say where the new example went:
$out"
pass "the edited config is kept (0640 root:ehrsync); the example lands beside it as ehrsync.toml.example, and install.sh says so"
cmp -s "$root/usr/local/bin/ehrsync" "$x/bin/ehrsync" || fail "the upgrade did not replace the binary"
expect "$root" /usr/local/bin/ehrsync "regular file" 755 0:0
pass "the binary is replaced"
[ "$(sha256sum < "$root/var/lib/ehrsync/demo/ehrsync-demo.db")" = "$data_sum" ] || fail "the upgrade changed the data"
expect "$root" /var/lib/ehrsync directory 700 "$uid:$gid"
ids=$(user_ids "$root")
read -r uid2 gid2 <<< "$ids"
[ "$uid2:$gid2" = "$uid:$gid" ] || fail "the user changed from $uid:$gid to $uid2:$gid2"
pass "the data, /var/lib/ehrsync (0700 ehrsync) and the user ($uid:$gid, once) are unchanged"
cmp -s "$unit" "$x/systemd/ehrsync.service" || fail "the upgrade did not install this release's unit"
saved=("$unit".edited-*)
if [ ${#saved[@]} -ne 1 ] || [ ! -f "${saved[0]}" ] || ! grep -q '(edited by hand)' "${saved[0]}"; then
  fail "the hand-edited unit was not saved beside the new one"
fi
pass "the unit is this release's; the hand-edited one is saved as ${saved[0]#"$root"}"
set +e
out=$(limit 60 sh "$x/install.sh" --root "$root" 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "install.sh --root, a third time, exited $rc:
$out"
saved=("$unit".edited-*)
[ ${#saved[@]} -eq 1 ] || fail "a third install saved the (unedited) unit again"
grep -q 'This was an upgrade' <<< "$out" || fail "the third install does not call itself an upgrade"
pass "a third run changes nothing more (no new saved unit)"

section "uninstall.sh --root (the installed copy), then install.sh --uninstall --purge"
set +e
out=$(limit 60 sh "$root/usr/local/share/ehrsync/uninstall.sh" --root "$root" 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "uninstall.sh --root exited $rc:
$out"
for f in /usr/local/bin/ehrsync /etc/systemd/system/ehrsync.service /usr/lib/sysusers.d/ehrsync.conf \
  /usr/local/share/ehrsync /usr/local/share/doc/ehrsync; do
  [ ! -e "$root$f" ] || fail "uninstall left $f"
done
cmp -s "$conf" "$tmp/edited.toml" || fail "uninstall removed or changed the config"
[ "$(sha256sum < "$root/var/lib/ehrsync/demo/ehrsync-demo.db")" = "$data_sum" ] || fail "uninstall removed or changed the data"
user_ids "$root" >/dev/null
pass "uninstall removes binary, unit, sysusers file, shared files and docs; keeps config, data and user"
set +e
out=$(limit 60 sh "$x/install.sh" --uninstall --purge --root "$root" 2>&1); rc=$?
set -e
[ "$rc" -eq 0 ] || fail "install.sh --uninstall --purge --root exited $rc:
$out"
for f in /etc/ehrsync /var/lib/ehrsync; do
  [ ! -e "$root$f" ] || fail "--purge left $f"
done
for db in passwd group shadow gshadow; do
  if [ -f "$root/etc/$db" ] && grep -q '^ehrsync:' "$root/etc/$db"; then fail "--purge left ehrsync in /etc/$db"; fi
done
left=$(cd "$root" && find . -name '*ehrsync*')
[ -z "$left" ] || fail "--purge left: $left"
expect "$root" /etc/credstore.encrypted directory 700 0:0
pass "--purge removes config, data, saved units and the user; nothing named ehrsync is left; credstores stay"

# --- 4. A distribution without systemd or dpkg ------------------------------------------------
# distro DIR TOOL...: a root with a static BusyBox (sh and the usual commands), /dev/null, a
# root-only /etc/passwd, and the given user-management tools with their libraries.
distro() {
  local d=$1 t l
  shift
  mkdir -p "$d"/{bin,sbin,usr/bin,usr/sbin,etc,dev,tmp,pkg}
  chmod 1777 "$d/tmp"
  cp "$busybox" "$d/bin/busybox"
  "$CHROOT" "$d" /bin/busybox --install -s
  mknod -m 666 "$d/dev/null" c 1 3 2>/dev/null || : > "$d/dev/null"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$d/etc/passwd"
  printf 'root:x:0:\n' > "$d/etc/group"
  printf 'root:*:19000:0:99999:7:::\n' > "$d/etc/shadow"
  printf 'root:*::\n' > "$d/etc/gshadow"
  chmod 0640 "$d/etc/shadow" "$d/etc/gshadow"
  for t in "$@"; do
    mkdir -p "$d$(dirname "$t")"
    cp -L "$t" "$d$t"
    for l in $(ldd "$t" | grep -o '/[^ ]*'); do
      mkdir -p "$d$(dirname "$l")"
      cp -L "$l" "$d$l"
    done
  done
  cp -a "$x/." "$d/pkg/"
}

for flavour in useradd sysusers; do
  case $flavour in
    useradd) tools=("$(command -v useradd)" "$(command -v userdel)" "$(command -v groupdel)")
      label="BusyBox + shadow's useradd" ;;
    sysusers) tools=("$(command -v systemd-sysusers)" "$(command -v userdel)" "$(command -v groupdel)")
      label="BusyBox + systemd-sysusers, systemd not running" ;;
  esac
  section "install.sh on a distribution without systemd or dpkg ($label)"
  d=$tmp/distro-$flavour
  distro "$d" "${tools[@]}"
  if [ -e "$d/usr/bin/dpkg" ] || [ -e "$d/bin/systemctl" ] || [ -d "$d/run/systemd/system" ]; then
    fail "the chroot has dpkg or systemd"
  fi
  set +e
  out=$(limit 60 "$CHROOT" "$d" /bin/sh /pkg/install.sh 2>&1); rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "install.sh in the chroot exited $rc:
$out"
  case $flavour in
    useradd) grep -q 'created (useradd --system)' <<< "$out" || fail "install.sh did not use useradd:
$out" ;;
    sysusers) grep -q 'created (systemd-sysusers)' <<< "$out" || fail "install.sh did not use systemd-sysusers:
$out" ;;
  esac
  grep -q "^Installed ehrsync $VERSION (commit" <<< "$out" || fail "install.sh did not run the installed binary:
$out"
  if grep -q 'daemon-reload' <<< "$out"; then fail "install.sh ran systemctl daemon-reload without systemd"; fi
  grep -q 'no CA certificates' <<< "$out" || fail "install.sh did not warn that the chroot has no CA certificates:
$out"
  grep -q 'this system does not run systemd' <<< "$out" || fail "install.sh's next steps do not say how to run it without systemd:
$out"
  ids=$(user_ids "$d")
  read -r uid gid <<< "$ids"
  check_installed "$d" "$uid" "$gid"
  pass "install.sh as root of the chroot: user ehrsync ($uid:$gid) by $flavour, files, modes and owners as above, no systemctl; warns: no CA certificates"
  check_service_user "$d" "$uid" "$gid"
  printf '# edited\n' >> "$d/etc/ehrsync/ehrsync.toml"
  cp -p "$d/etc/ehrsync/ehrsync.toml" "$tmp/edited.toml"
  set +e
  out=$(with_ca_bundle "$d" limit 60 "$CHROOT" "$d" /bin/sh /pkg/install.sh 2>&1); rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "install.sh in the chroot, run again, exited $rc:
$out"
  if grep -q 'no CA certificates' <<< "$out"; then fail "install.sh warned of no CA certificates with a bundle in place"; fi
  cmp -s "$d/etc/ehrsync/ehrsync.toml" "$tmp/edited.toml" || fail "the upgrade in the chroot changed the edited config"
  [ -f "$d/etc/ehrsync/ehrsync.toml.example" ] || fail "the upgrade in the chroot left no ehrsync.toml.example"
  ids=$(user_ids "$d")
  [ "$ids" = "$uid $gid" ] || fail "the upgrade in the chroot changed the user"
  pass "run again (with a CA bundle): config kept, example beside it, same user, no CA warning"
  set +e
  out=$(limit 60 "$CHROOT" "$d" /bin/sh /usr/local/share/ehrsync/uninstall.sh --purge 2>&1); rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "uninstall.sh --purge in the chroot exited $rc:
$out"
  for f in /usr/local/bin/ehrsync /etc/systemd/system/ehrsync.service /etc/ehrsync /var/lib/ehrsync \
    /usr/local/share/ehrsync; do
    [ ! -e "$d$f" ] || fail "uninstall.sh --purge in the chroot left $f"
  done
  for db in passwd group shadow gshadow; do
    if grep -q '^ehrsync:' "$d/etc/$db"; then fail "uninstall.sh --purge (userdel) left ehrsync in /etc/$db"; fi
  done
  pass "uninstall.sh --purge in the chroot: files, config, data, user and group gone"
done

echo "tarball test: all checks passed in $((SECONDS - started)) s ($archive, $(stat -c %s "$archive") bytes)"
