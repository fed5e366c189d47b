#!/usr/bin/env bash
# Tests the Windows installer $DIST/ehrsync-$VERSION-x64.msi on Linux, as .ci/package-test runs it
# from the repository root (VERSION=0.1.0 DIST=target/dist bash packaging/windows/test.sh):
#
# 1. Its tables (msiinfo): the files and where they go, the service as src/service.rs registers it
#    (name, display name, description, account NT SERVICE\ehrsync, automatic start, arguments),
#    removal on uninstall, restart on failure, the config kept (NeverOverwrite, Permanent), the
#    version and the upgrade code, the upgrade and downgrade rules.
# 2. The exe it carries (msiextract), under Wine: --version, check-config on the example config it
#    installs (placeholders filled as config/example.env does) and on a broken copy, and
#    `ehrsync demo`: every demo account valid, patients in the demo database.
# 3. The MSI itself under Wine's msiexec and service manager: install (files, config, service
#    registered but not started, restart-on-failure commands run), the service started with a
#    config of ours against the demo's sandbox (it serves /readyz and stops gracefully), an upgrade
#    to a newer MSI (config kept, one product registered, service running again), a refused
#    downgrade, and uninstall (service gone, C:\ProgramData\ehrsync kept).
#
# Wine 8 (Debian 12) needs two test-only shims from packaging/windows/wine-shim, never shipped:
# bcryptprimitives.dll beside ehrsync.exe (Rust's std needs ProcessPrng), and an sc.exe stand-in
# (Wine's sc.exe lacks `failureflag`, which the MSI runs: the stand-in answers it, records every
# command the MSI runs, and passes the others to Wine's own sc.exe).
# Not covered here, because Wine does not implement it: real Windows SCM failure actions, service
# SIDs and ACLs (the virtual account), and Windows Installer itself (Wine's msi is a reimplementation).
#
# Installs wine, msitools, wixl, gcc-mingw-w64-x86-64, sqlite3 and curl when missing. Everything
# else stays in a temporary directory (its own WINEPREFIX), removed at the end unless KEEP_TMP=1
# (its msiexec logs and C:\sc-calls.log help when something fails).
set -euo pipefail

: "${VERSION:?set VERSION (the version in Cargo.toml, e.g. 0.1.0)}"
: "${DIST:?set DIST (where .ci/package put the artifacts, e.g. target/dist)}"
here=packaging/windows
msi=$DIST/ehrsync-$VERSION-x64.msi
# Never change it (packaging/windows/ehrsync.wxs): a newer MSI replaces an older one through it.
UPGRADE_CODE='{2EBA6EA3-8199-4A35-AFF9-35BBF5040C29}'
DEMO_SECONDS=80

pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
[ -f "$here/ehrsync.wxs" ] || fail "run me from the repository root (no $here/ehrsync.wxs here)"
[ -f "$msi" ] || fail "no $msi: run .ci/package first (or packaging/windows/build.sh)"
started=$SECONDS

# --- tools ----------------------------------------------------------------------------------------
. .ci/lib.sh   # run from the repository root
missing=()
command -v wine >/dev/null 2>&1 && [ -x /usr/lib/wine/wine64 ] || missing+=(wine wine64)
command -v msiinfo >/dev/null 2>&1 && command -v msiextract >/dev/null 2>&1 || missing+=(msitools)
command -v wixl >/dev/null 2>&1 || missing+=(wixl)
command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || missing+=(gcc-mingw-w64-x86-64)
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

tmp=$(mktemp -d)
export WINEPREFIX=$tmp/prefix WINEDEBUG=-all WINEARCH=win64
demo_pid=
cleanup() {
  if [ -n "$demo_pid" ]; then kill "$demo_pid" 2>/dev/null || true; fi
  if [ -d "$WINEPREFIX" ]; then timeout 30 wineserver -k 2>/dev/null || true; fi
  if [ -n "${KEEP_TMP:-}" ]; then echo "kept $tmp (KEEP_TMP)"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# --- 1. the tables --------------------------------------------------------------------------------
echo "== $msi ($(du -k "$msi" | cut -f1) KiB): tables"
# rows TABLE: the table's rows, tab-separated, without msiinfo's three header lines.
rows() { msiinfo export "$msi" "$1" | tr -d '\r' | tail -n +4; }
# cell TABLE KEY COLUMN: COLUMN of the row whose first column is KEY.
cell() {
  msiinfo export "$msi" "$1" | tr -d '\r' | awk -F'\t' -v key="$2" -v col="$3" '
    NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
    NR <= 3 { next }
    c && $1 == key { print $c; found = 1 }
    END { if (!c) { print "no column " col > "/dev/stderr"; exit 2 }
          if (!found) { print "no row " key > "/dev/stderr"; exit 3 } }'
}
expect() { # WHAT GOT WANT
  [ "$2" == "$3" ] || fail "$1: is '$2', should be '$3'"
  pass "$1: $2"
}
bits() { # WHAT VALUE SET-MASK CLEAR-MASK
  (( ($2 & $3) == $3 && ($2 & $4) == 0 )) \
    || fail "$1: $2 should have the bits $3 set and $4 clear"
  pass "$1: $2"
}
# A `pub const NAME: &str = "...";` of src/service.rs, with Rust's line continuations joined.
rust_str() {
  NAME=$1 perl -0777 -ne 'print $1 =~ s/\\\n\s*//gr
    if /pub const \Q$ENV{NAME}\E: &str =\s*r?"((?:[^"\\]|\\.)*)"/s' src/service.rs
}
# The seconds of a `from_secs(N)` in the line of src/service.rs that contains PATTERN.
rust_secs() {
  PAT=$1 perl -ne 'if (index($_, $ENV{PAT}) >= 0 && /from_secs\(([\d_]+)\)/) { ($s = $1) =~ s/_//g; print $s; exit }' src/service.rs
}
service_name=$(rust_str SERVICE_NAME); display_name=$(rust_str DISPLAY_NAME)
description=$(rust_str DESCRIPTION); account=$(rust_str ACCOUNT)
restart=$(rust_secs 'pub const RESTART_DELAY:'); restart_later=$(rust_secs 'pub const RESTART_DELAY_LATER:')
reset=$(rust_secs 'ServiceFailureResetPeriod::After')
for v in service_name display_name description account restart restart_later reset; do
  [ -n "${!v}" ] || fail "cannot read $v from src/service.rs: this test needs updating"
done

expect "summary template (64-bit package)" "$(msiinfo suminfo "$msi" | sed -n 's/^Template: //p')" 'x64;1033'
expect "ProductVersion" "$(cell Property ProductVersion Value)" "$VERSION"
expect "UpgradeCode" "$(cell Property UpgradeCode Value)" "$UPGRADE_CODE"
expect "ALLUSERS (per machine)" "$(cell Property ALLUSERS Value)" 1

expect "ehrsync.exe in component" "$(cell File ehrsync.exe Component_)" Program
expect "Program component's directory" "$(cell Component Program Directory_)" INSTALLDIR
expect "Program component's key" "$(cell Component Program KeyPath)" ehrsync.exe
expect "INSTALLDIR's parent" "$(cell Directory INSTALLDIR Directory_Parent)" ProgramFiles64Folder
expect "INSTALLDIR's name" "$(cell Directory INSTALLDIR DefaultDir)" ehrsync
if rows File | grep -qi bcryptprimitives; then fail "the MSI carries bcryptprimitives.dll (Wine-only shim)"; fi
pass "no Wine shim in the File table"

expect "ehrsync.toml in component" "$(cell File ehrsync.toml Component_)" Config
expect "Config component's directory" "$(cell Component Config Directory_)" DATADIR
expect "DATADIR's parent" "$(cell Directory DATADIR Directory_Parent)" CommonAppDataFolder
expect "DATADIR's name" "$(cell Directory DATADIR DefaultDir)" ehrsync
# 16 Permanent, 128 NeverOverwrite, 256 64-bit.
bits "Config component's attributes (Permanent, NeverOverwrite, 64-bit)" "$(cell Component Config Attributes)" $((16 | 128 | 256)) 0

expect "service name" "$(cell ServiceInstall ehrsync Name)" "$service_name"
expect "service display name" "$(cell ServiceInstall ehrsync DisplayName)" "$display_name"
expect "service description" "$(cell ServiceInstall ehrsync Description)" "$description"
expect "service account" "$(cell ServiceInstall ehrsync StartName)" "$account"
expect "service password (none: a virtual account)" "$(cell ServiceInstall ehrsync Password)" ""
expect "service type (own process)" "$(cell ServiceInstall ehrsync ServiceType)" 16
expect "service start (automatic)" "$(cell ServiceInstall ehrsync StartType)" 2
expect "service error control (normal, vital)" "$(cell ServiceInstall ehrsync ErrorControl)" $((0x8000 | 1))
# What `ehrsync service install` registers: `service run --config <absolute config path>`.
expect "service arguments" "$(cell ServiceInstall ehrsync Arguments)" \
  'service run --config "[CommonAppDataFolder]ehrsync\ehrsync.toml"'
expect "service's component (the one holding ehrsync.exe)" "$(cell ServiceInstall ehrsync Component_)" Program
expect "service control's service" "$(cell ServiceControl ehrsync Name)" "$service_name"
# 2 stop at install, 32 stop at uninstall, 128 delete at uninstall; never 1 or 16 (start).
bits "service control events (stop, remove on uninstall, never start)" \
  "$(cell ServiceControl ehrsync Event)" $((2 | 32 | 128)) $((1 | 16 | 8 | 64))
expect "service control waits for the stop (up to 30 s)" "$(cell ServiceControl ehrsync Wait)" 1
expect "service control's component" "$(cell ServiceControl ehrsync Component_)" Program

failure="failure $service_name reset= $reset actions= restart/$((restart * 1000))/restart/$((restart * 1000))/restart/$((restart_later * 1000))"
expect "restart-on-failure command" "$(cell CustomAction ServiceFailureActions Target)" "$failure"
expect "non-crash failures command" "$(cell CustomAction ServiceFailureFlag Target)" "failureflag $service_name 1"
expect "start-after-upgrade command" "$(cell CustomAction StartAfterUpgrade Target)" "start $service_name"
expect "sc.exe path" "$(cell CustomAction SetScExe Target)" '[System64Folder]sc.exe'
# 50 exe named by a property, 1024 deferred, 2048 as LocalSystem (no impersonation); 64 ignore exit code.
for ca in ServiceFailureActions ServiceFailureFlag; do
  bits "$ca type (deferred, LocalSystem, exit code checked)" "$(cell CustomAction $ca Type)" $((50 | 1024 | 2048)) 64
done
bits "StartAfterUpgrade type (deferred, LocalSystem, exit code ignored)" "$(cell CustomAction StartAfterUpgrade Type)" $((50 | 64 | 1024 | 2048)) 0
sequence_of() { cell InstallExecuteSequence "$1" Sequence; }
in_order() {
  local prev=-1 name s
  for name in "$@"; do
    s=$(sequence_of "$name"); (( s > prev )) || fail "sequence: $* is not in this order ($name at $s)"; prev=$s
  done
  pass "sequence: $*"
}
in_order InstallValidate RemoveExistingProducts InstallInitialize
in_order InstallFiles InstallServices ServiceFailureActions ServiceFailureFlag StartServices StartAfterUpgrade InstallFinalize
expect "ServiceFailureActions runs" "$(cell InstallExecuteSequence ServiceFailureActions Condition)" 'NOT REMOVE~="ALL"'
expect "StartAfterUpgrade runs" "$(cell InstallExecuteSequence StartAfterUpgrade Condition)" 'WIX_UPGRADE_DETECTED AND NOT REMOVE~="ALL"'
upgrade_rows=$(rows Upgrade)
expect "upgrade rule (older or same version replaced)" \
  "$(awk -F'\t' '$7 == "WIX_UPGRADE_DETECTED" { print $1, "[" $2 "," $3 "]", $5 }' <<<"$upgrade_rows")" \
  "$UPGRADE_CODE [,$VERSION] 513"
expect "downgrade rule (newer version detected)" \
  "$(awk -F'\t' '$7 == "WIX_DOWNGRADE_DETECTED" { print $1, "[" $2 "," $3 "]", $5 }' <<<"$upgrade_rows")" \
  "$UPGRADE_CODE [$VERSION,] 2"
rows LaunchCondition | grep -q $'^NOT WIX_DOWNGRADE_DETECTED\t' || fail "no launch condition refusing a downgrade"
pass "launch condition refuses a downgrade"

# --- 2. the exe, under Wine -----------------------------------------------------------------------
echo "== the exe it carries, under Wine"
msiextract -C "$tmp/msi" "$msi" >/dev/null
payload=$tmp/msi/ehrsync
[ -f "$payload/ehrsync.exe" ] || fail "msiextract found no ehrsync.exe in $msi"
shims=$tmp/shims
mkdir -p "$shims"
x86_64-w64-mingw32-gcc -O2 -s -shared -o "$shims/bcryptprimitives.dll" "$here/wine-shim/bcryptprimitives.c" -lbcrypt
x86_64-w64-mingw32-gcc -O2 -s -municode -o "$shims/sc.exe" "$here/wine-shim/sc.c"
bin=$tmp/bin
mkdir -p "$bin"
cp "$payload/ehrsync.exe" "$shims/bcryptprimitives.dll" "$bin/"

t=$SECONDS
mkdir -p "$WINEPREFIX"
WINEDLLOVERRIDES='mscoree,mshtml=' timeout 180 wineboot -i >"$tmp/wineboot.log" 2>&1 \
  || fail "wineboot could not create $WINEPREFIX (exit $?): $(tail -5 "$tmp/wineboot.log")"
# `wineboot -i` leaves two services.exe running, two service managers that answer by turns, one
# of them blind to services created since: start one session afresh, kept alive (-p) across the
# commands below.
timeout 30 wineserver -k || true
timeout 30 wineserver -w || true
wineserver -p || fail "cannot start wineserver for $WINEPREFIX"
timeout 120 wineboot >>"$tmp/wineboot.log" 2>&1 || fail "wineboot could not start $WINEPREFIX: $(tail -5 "$tmp/wineboot.log")"
scms=0
for proc in /proc/[0-9]*; do
  grep -qa 'services\.exe' "$proc/cmdline" 2>/dev/null || continue
  if tr '\0' '\n' <"$proc/environ" 2>/dev/null | grep -qxF "WINEPREFIX=$WINEPREFIX"; then scms=$((scms + 1)); fi
done
[ "$scms" -eq 1 ] || fail "$scms service managers (services.exe) run in $WINEPREFIX, not 1"
pass "Wine prefix ready in $((SECONDS - t)) s"
win() { winepath -w "$1"; }
C=$WINEPREFIX/drive_c

out=$(timeout 60 wine "$bin/ehrsync.exe" --version | tr -d '\r') || fail "ehrsync.exe --version exited $?"
[[ $out =~ ^ehrsync\ ${VERSION//./\\.}\ \(commit\ [^\)]+\)$ ]] || fail "--version printed '$out'"
pass "--version: $out"

# The example config as the MSI installs it, with its placeholders filled as config/example.env
# fills them: secrets from the environment, the credential directory holding niko-secret.
mkdir -p "$tmp/credentials"
cp config/example-credentials/niko-secret "$tmp/credentials/"
example_env=()
while IFS='=' read -r name value; do
  case $name in ''|'#'*) continue ;; CREDENTIALS_DIRECTORY) value=$(win "$tmp/credentials") ;; esac
  example_env+=("$name=$value")
done < config/example.env
[ ${#example_env[@]} -ge 5 ] || fail "config/example.env set ${#example_env[@]} variables, expected 5"
cp "$payload/ehrsync.toml" "$tmp/example.toml"
rc=0
out=$(env "${example_env[@]}" timeout 60 wine "$bin/ehrsync.exe" --config "$(win "$tmp/example.toml")" check-config 2>"$tmp/err") || rc=$?
out=$(tr -d '\r' <<<"$out")
[ $rc -eq 0 ] || fail "check-config on the installed example exited $rc: $(cat "$tmp/err")"
grep -q '^OK: 4 accounts, 3 jobs' <<<"$out" || fail "check-config did not end with 'OK: 4 accounts, 3 jobs': $out"
# The example's Linux database path is commented out for Windows: the default applies.
grep -qF 'database        C:\ProgramData\ehrsync\ehrsync.db' <<<"$out" \
  || fail "check-config does not put the database in C:\\ProgramData\\ehrsync: $(grep database <<<"$out")"
pass "check-config on the installed example config: exit 0, 4 accounts, database in C:\\ProgramData\\ehrsync"
sed 's/^shutdown_grace = "20s"/shutdown_grace = 20/' "$tmp/example.toml" > "$tmp/broken.toml"
cmp -s "$tmp/example.toml" "$tmp/broken.toml" && fail "could not break the example config (no shutdown_grace line)"
rc=0
env "${example_env[@]}" timeout 60 wine "$bin/ehrsync.exe" --config "$(win "$tmp/broken.toml")" check-config >/dev/null 2>"$tmp/err" || rc=$?
[ $rc -eq 2 ] || fail "check-config on a broken config exited $rc, not 2: $(cat "$tmp/err")"
grep -q 'shutdown_grace' "$tmp/err" || fail "check-config's error does not name agent.shutdown_grace: $(cat "$tmp/err")"
pass "check-config on a broken copy: exit 2, naming agent.shutdown_grace"

# The demo runs in the background while section 3 uses its vendor sandbox.
demo_dir=$tmp/demo
timeout $((DEMO_SECONDS + 60)) wine "$bin/ehrsync.exe" demo --for "${DEMO_SECONDS}s" --dir "$(win "$demo_dir")" \
  --metrics-port 0 >"$tmp/demo.out" 2>"$tmp/demo.err" &
demo_pid=$!
demo_started=$SECONDS
for _ in $(seq 1 60); do
  grep -q 'vendor sandbox at http://127.0.0.1:' "$tmp/demo.out" 2>/dev/null && break
  kill -0 "$demo_pid" 2>/dev/null || fail "ehrsync demo stopped at once: $(cat "$tmp/demo.out" "$tmp/demo.err")"
  sleep 1
done
sandbox=$(sed -n 's/.*vendor sandbox at \(http:\/\/127\.0\.0\.1:[0-9]*\).*/\1/p' "$tmp/demo.out" | tr -d '\r')
[ -n "$sandbox" ] || fail "ehrsync demo did not start its sandbox: $(cat "$tmp/demo.out" "$tmp/demo.err")"
pass "ehrsync demo started, sandbox at $sandbox (runs ${DEMO_SECONDS} s)"

# --- 3. the MSI, under Wine's msiexec and service manager -----------------------------------------
echo "== the MSI under Wine's msiexec and service manager"
# sc.exe stand-in (see the top): Wine's own sc.exe stays available to it as sc-wine.exe.
sys32=$C/windows/system32
cp "$sys32/sc.exe" "$sys32/sc-wine.exe"
cp "$shims/sc.exe" "$sys32/sc.exe"
timeout 30 wine reg add 'HKCU\Software\Wine\DllOverrides' /v sc.exe /d native /f >/dev/null
sc_calls=$C/sc-calls.log
msiexec() { # LOG ARGS...: Wine's msiexec, silent, with a verbose log
  local log=$1; shift
  timeout 180 wine msiexec "$@" /qn /l*v "$(win "$tmp/$log")" >>"$tmp/msiexec.out" 2>&1
}
service_state() { # STOPPED, RUNNING, ... or NONE
  local out
  out=$(timeout 30 wine sc query "$service_name" 2>/dev/null | tr -d '\r') || { echo NONE; return; }
  sed -n 's/^ *STATE *: *[0-9]* *\([A-Z_]*\).*/\1/p' <<<"$out"
}
wait_state() { # STATE SECONDS
  local i
  for ((i = 0; i < $2; i++)); do [ "$(service_state)" == "$1" ] && return 0; sleep 1; done
  return 1
}
service_key="HKLM\\System\\CurrentControlSet\\Services\\$service_name"
reg_value() { # KEY NAME
  timeout 30 wine reg query "$1" /v "$2" 2>/dev/null | tr -d '\r' \
    | sed -n "s/^ *$2 *REG_[A-Z_]* *//p"
}
program=$C/'Program Files/ehrsync'
data=$C/ProgramData/ehrsync

msiexec install.log /i "$(win "$msi")" || fail "msiexec /i exited $? (log: $(tail -5 "$tmp/install.log"))"
pass "msiexec /i $(basename "$msi") /qn: exit 0"
for f in ehrsync.exe LICENSE.txt README.md ehrsync.example.toml docs/operations.md; do
  [ -f "$program/$f" ] || fail "not installed: C:\\Program Files\\ehrsync\\$f"
done
pass "installed C:\\Program Files\\ehrsync\\{ehrsync.exe,LICENSE.txt,README.md,ehrsync.example.toml,docs\\}"
cmp -s "$data/ehrsync.toml" "$payload/ehrsync.toml" || fail "C:\\ProgramData\\ehrsync\\ehrsync.toml is not the example config"
pass "installed C:\\ProgramData\\ehrsync\\ehrsync.toml (the example)"
image=$(reg_value "$service_key" ImagePath)
# Windows Installer quotes the exe's path; Wine's msi does not: accept both.
[[ $image =~ ^\"?C:\\Program\ Files\\ehrsync\\ehrsync\.exe\"?\ service\ run\ --config\ \"C:\\ProgramData\\ehrsync\\ehrsync\.toml\"$ ]] \
  || fail "service command line: $image"
pass "service registered: $image"
expect "service account (registry)" "$(reg_value "$service_key" ObjectName)" "$account"
expect "service start (registry, 2 = automatic)" "$(reg_value "$service_key" Start)" 0x2
expect "service state after install (not started)" "$(service_state)" STOPPED
ran=$(find "$C/ProgramData" "$C/users/Public" -path '*/ehrsync/logs/*' 2>/dev/null)
[ -z "$ran" ] || fail "the service ran during the install: $ran"
grep -qxF "$failure" <(tr -d '\r' < "$sc_calls") || fail "the install did not run sc.exe $failure: $(cat "$sc_calls")"
grep -qxF "failureflag $service_name 1" <(tr -d '\r' < "$sc_calls") || fail "the install did not run sc.exe failureflag: $(cat "$sc_calls")"
pass "restart on failure configured: sc.exe $failure; sc.exe failureflag $service_name 1"

# A config of ours: one NikoHealth account against the demo's sandbox, its secret in a file as
# docs/operations.md says, /metrics on a free port.
port=
for p in $(shuf -i 20000-29999 -n 20); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || fail "no free port for the service's /metrics"
niko=$(awk '/^\[accounts\.demo-nikohealth\]/ { on = 1; next } /^\[/ { on = 0 } on && /^(api_base|token_url|client_id) =/' \
  "$demo_dir/ehrsync-demo.toml")
[ "$(grep -c . <<<"$niko")" -eq 3 ] || fail "the demo config has no demo-nikohealth account: $(cat "$demo_dir/ehrsync-demo.toml")"
niko_secret=$(perl -0777 -ne 'print $1 if /NIKOHEALTH_CREDENTIALS: SandboxCredentials = SandboxCredentials \{.*?client_secret: "([^"]*)"/s' src/sandbox/mod.rs)
[ -n "$niko_secret" ] || fail "cannot read the sandbox's NikoHealth secret from src/sandbox/mod.rs"
mkdir -p "$data/secrets"
printf '%s\r\n' "$niko_secret" > "$data/secrets/niko-secret"
cat > "$data/ehrsync.toml" <<EOF
[agent]
database = 'C:\ProgramData\ehrsync\ehrsync.db'
metrics_listen = "127.0.0.1:$port"
shutdown_grace = "5s"

[accounts.niko]
vendor = "nikohealth"
$niko
client_secret = { file = "secrets/niko-secret" }
EOF
cp "$data/ehrsync.toml" "$tmp/ours.toml"
timeout 60 wine "$program/ehrsync.exe" --config 'C:\ProgramData\ehrsync\ehrsync.toml' check-config >/dev/null 2>"$tmp/err" \
  && fail "ehrsync.exe ran in C:\\Program Files\\ehrsync without the Wine shim beside it?"
cp "$shims/bcryptprimitives.dll" "$program/"  # Wine only, see the top
timeout 60 wine "$program/ehrsync.exe" --config 'C:\ProgramData\ehrsync\ehrsync.toml' check-config >/dev/null 2>"$tmp/err" \
  || fail "our service config is invalid: $(cat "$tmp/err")"

ready() { # SECONDS: /readyz answers 200 within that long
  local i
  for ((i = 0; i < $1; i++)); do
    curl -fsS --max-time 2 "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
net() { # start|stop SERVICE: net.exe succeeds and the service's state becomes RUNNING|STOPPED
  local want=RUNNING
  [ "$1" == stop ] && want=STOPPED
  timeout 90 wine net "$@" >"$tmp/net.out" 2>&1 && wait_state "$want" 30
}
net start "$service_name" || fail "service state $(service_state), not RUNNING, after net start: $(cat "$tmp/net.out")"
# The service logs to %ProgramData%\ehrsync\logs, and Wine gives services ProgramData=C:\users\Public.
for _ in $(seq 1 20); do
  log=$(find "$C/ProgramData" "$C/users/Public" -path '*/ehrsync/logs/ehrsync.log' 2>/dev/null | head -n1)
  [ -n "$log" ] && break
  sleep 1
done
[ -n "$log" ] || fail "the running service wrote no ehrsync\\logs\\ehrsync.log"
ready 45 || fail "the service does not serve /readyz on 127.0.0.1:$port: $(tail -5 "$log")"
curl -fsS "http://127.0.0.1:$port/metrics" | grep -q "^ehrsync_build_info{.*version=\"$VERSION\"" \
  || fail "/metrics has no ehrsync_build_info for $VERSION"
pass "net start $service_name: RUNNING, /readyz 200 (token from the sandbox), /metrics of $VERSION"
net stop "$service_name" || fail "service state $(service_state) after net stop: $(cat "$tmp/net.out")"
grep -q 'asks ehrsync to stop' "$log" || fail "the service log shows no graceful stop: $(tail -5 "$log")"
pass "net stop $service_name: STOPPED, gracefully (its log: ${log#"$C/"})"

# Upgrade: the same exe in an MSI of the next version, over a running service.
next=${VERSION%.*}.$((${VERSION##*.} + 1))
VERSION=$next DIST=$tmp/next WINDOWS_EXE=$payload/ehrsync.exe bash "$here/build.sh" >/dev/null
msi_next=$tmp/next/ehrsync-$next-x64.msi
net start "$service_name" || fail "cannot start the service before the upgrade: $(cat "$tmp/net.out")"
stops() { grep -c 'asks ehrsync to stop' "$log" || true; }
stopped_since() { # N: the service logged more than N graceful stops, within 15 s
  local i
  for ((i = 0; i < 15; i++)); do (( $(stops) > $1 )) && return 0; sleep 1; done
  return 1
}
stops_before=$(stops)
: > "$sc_calls"
msiexec upgrade.log /i "$(win "$msi_next")" || fail "msiexec /i (upgrade to $next) exited $? (log: $(tail -5 "$tmp/upgrade.log"))"
cmp -s "$data/ehrsync.toml" "$tmp/ours.toml" || fail "the upgrade changed C:\\ProgramData\\ehrsync\\ehrsync.toml"
stopped_since "$stops_before" || fail "the upgrade did not stop the running service gracefully"
products() { # the DisplayVersion of each product named ehrsync in Windows' list of installed programs
  timeout 30 wine reg query 'HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall' /s 2>/dev/null | tr -d '\r' \
    | awk '/^HKEY_/ { key = $0 } /DisplayName +REG_SZ +ehrsync$/ { n[key]++ } /DisplayVersion +REG_SZ/ { v[key] = $NF }
           END { for (k in n) print v[k] }' | sort | tr '\n' ' ' | sed 's/ $//'
}
expect "products registered after the upgrade" "$(products)" "$next"
grep -qx "start $service_name" <(tr -d '\r' < "$sc_calls") || fail "the upgrade did not start the service again: $(cat "$sc_calls")"
{ wait_state RUNNING 30 && ready 45; } || fail "the service is not serving after the upgrade: $(tail -5 "$log")"
pass "upgrade to $next over the running service: config kept, service stopped gracefully, re-registered, started again (/readyz 200)"
rc=0
msiexec downgrade.log /i "$(win "$msi")" || rc=$?
[ $rc -ne 0 ] || fail "an older MSI ($VERSION) installed over $next"
grep -aq '^Property(S): WIX_DOWNGRADE_DETECTED = {' "$tmp/downgrade.log" \
  || fail "the downgrade failed, but not on its launch condition (see downgrade.log)"
expect "products registered after the refused downgrade" "$(products)" "$next"
pass "downgrade to $VERSION refused (msiexec exit $rc)"

msiexec uninstall.log /x "$(win "$msi_next")" || fail "msiexec /x exited $? (log: $(tail -5 "$tmp/uninstall.log"))"
expect "service after uninstall" "$(service_state)" NONE
timeout 30 wine reg query "$service_key" >/dev/null 2>&1 && fail "uninstall left the registry key $service_key"
for f in LICENSE.txt README.md CHANGELOG.md ehrsync.example.toml docs/operations.md; do
  [ ! -e "$program/$f" ] || fail "uninstall left C:\\Program Files\\ehrsync\\$f"
done
exe_note="ehrsync.exe removed"
if [ -e "$program/ehrsync.exe" ]; then
  # Wine's StopServices sends the stop and goes on at once (Windows waits up to 30 s for the
  # service to stop: Wait=1 above), so its RemoveFiles may find ehrsync.exe still in use by the
  # exiting service. The MSI must have asked for its removal all the same.
  grep -aqx 'File: ehrsync.exe, Directory: INSTALLDIR' <(tr -d '\r' < "$tmp/uninstall.log") \
    || fail "uninstall left C:\\Program Files\\ehrsync\\ehrsync.exe, and did not try to remove it"
  exe_note="ehrsync.exe asked to be removed (Wine found it still in use: its StopServices does not wait)"
fi
cmp -s "$data/ehrsync.toml" "$tmp/ours.toml" || fail "uninstall removed or changed C:\\ProgramData\\ehrsync\\ehrsync.toml"
for f in "$data/ehrsync.db" "$data/ehrsync.key" "$data/secrets/niko-secret" "$log"; do
  [ -f "$f" ] || fail "uninstall removed ${f#"$C/"}"
done
stopped_since $((stops_before + 1)) || fail "the uninstall did not stop the running service gracefully"
pass "msiexec /x: service stopped gracefully and removed, program files removed, $exe_note; C:\\ProgramData\\ehrsync kept (config, database, key, log, secrets)"

# --- the demo's outcome ---------------------------------------------------------------------------
echo "== ehrsync demo (started in section 2)"
rc=0
wait "$demo_pid" || rc=$?
demo_pid=
out=$(tr -d '\r' < "$tmp/demo.out")
[ $rc -eq 0 ] || fail "ehrsync demo exited $rc: $out $(tail -20 "$tmp/demo.err")"
pass "ehrsync demo --for ${DEMO_SECONDS}s: exit 0 after $((SECONDS - demo_started)) s"
# The last status table: every demo account valid.
table=$(awk '/^── ehrsync demo, / { t = "" } { t = t $0 "\n" } END { printf "%s", t }' <<<"$out" | grep '^demo-')
for account in demo-nextech demo-carecentric demo-nikohealth demo-nethealth; do
  state=$(awk -v a="$account" '$1 == a { print $2 }' <<<"$table")
  expect "demo account $account at the end" "$state" valid
done
db=$demo_dir/ehrsync-demo.db
counts=$(sqlite3 "$db" "SELECT account || '=' || count(*) FROM patients GROUP BY account ORDER BY account" | tr '\n' ' ')
for account in demo-carecentric demo-nextech demo-nikohealth; do
  n=$(sqlite3 "$db" "SELECT count(*) FROM patients WHERE account = '$account'")
  (( n > 0 )) || fail "the demo pulled no patients for $account ($counts)"
done
failed=$(sqlite3 "$db" "SELECT count(*) FROM sync_runs WHERE outcome NOT IN ('success', 'interrupted')")
expect "demo pulls that failed" "$failed" 0
pass "demo database: patients $counts"

echo "== Windows: every check passed in $((SECONDS - started)) s"
