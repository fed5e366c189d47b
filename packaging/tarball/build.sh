#!/usr/bin/env bash
# Builds $DIST/ehrsync-$VERSION-x86_64-linux-musl.tar.gz: the static Linux binary, the systemd
# unit and sysusers file, the example config and Prometheus files, install.sh/uninstall.sh and
# the documentation, under one top directory ehrsync-$VERSION-x86_64-linux-musl/.
#
# Called by .ci/package from the repository root after
#   cargo build --locked --release --target x86_64-unknown-linux-musl
# with these variables (the defaults are what .ci/package sets):
#   VERSION    the release, e.g. 0.1.0 (default: Cargo.toml's version)
#   DIST       output directory, relative to the repository root (default: target/dist)
#   LINUX_BIN  the static binary (default: target/x86_64-unknown-linux-musl/release/ehrsync)
#   SOURCE_DATE_EPOCH  timestamp of every archive entry (default: the commit's time,
#                      `git log -1 --format=%ct`)
# The binary must be statically linked (it runs on any x86_64 Linux, whatever its C library);
# the archive's copy is stripped. The archive is reproducible: the same inputs give the same
# bytes (sorted entries, owner 0:0, fixed modes, one timestamp, gzip without name or time).
set -euo pipefail

die() { echo "tarball/build: $*" >&2; exit 1; }

if [ ! -f Cargo.toml ] || [ ! -d packaging/tarball ]; then
  die "run this from the repository root (where Cargo.toml is), not $PWD"
fi

VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)}
DIST=${DIST:-target/dist}
LINUX_BIN=${LINUX_BIN:-target/x86_64-unknown-linux-musl/release/ehrsync}
[ -n "$VERSION" ] || die "VERSION is empty and Cargo.toml names no version"

for tool in file strip tar gzip; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "'$tool' is missing (Debian: apt-get install file binutils tar gzip)"
done

if [ ! -f "$LINUX_BIN" ] || [ ! -x "$LINUX_BIN" ]; then
  die "no executable binary at LINUX_BIN=$LINUX_BIN; build it first:
  cargo build --locked --release --target x86_64-unknown-linux-musl"
fi

# Static, x86-64: `file` says "statically linked" (or "static-pie linked", what Rust's musl
# target produces). A dynamically linked binary would need a loader and libraries the target
# machine may not have.
info=$(file -b -L -- "$LINUX_BIN")
case $info in
  ELF\ 64-bit*x86-64*) ;;
  *) die "$LINUX_BIN is not an x86-64 ELF executable: $info" ;;
esac
case $info in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) die "$LINUX_BIN is not statically linked: $info
  (build it for x86_64-unknown-linux-musl, not the host's glibc target)" ;;
esac

# The binary must be this release: it runs here, being static.
bin_version=$("$LINUX_BIN" --version) || die "$LINUX_BIN --version failed"
case $bin_version in
  "ehrsync $VERSION (commit "*")") ;;
  *) die "$LINUX_BIN --version says '$bin_version', expected 'ehrsync $VERSION (commit …)'" ;;
esac
head_commit=$(git rev-parse --short=12 HEAD 2>/dev/null || true)
bin_commit=${bin_version##* (commit }
bin_commit=${bin_commit%)}
if [ -n "$head_commit" ] && [ "$bin_commit" != "$head_commit" ]; then
  echo "tarball/build: warning: $LINUX_BIN was built from commit $bin_commit, HEAD is $head_commit" >&2
fi

if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  epoch=$SOURCE_DATE_EPOCH
elif epoch=$(git log -1 --format=%ct 2>/dev/null) && [ -n "$epoch" ]; then
  :
else
  die "set SOURCE_DATE_EPOCH (not a git checkout, so the commit's time is unknown)"
fi
case $epoch in
  '' | *[!0-9]*) die "SOURCE_DATE_EPOCH must be seconds since 1970, not '$epoch'" ;;
esac

name=ehrsync-$VERSION-x86_64-linux-musl
archive=$DIST/$name.tar.gz

# What goes in: source path in the repository, path in the archive, mode.
files=(
  "$LINUX_BIN"                          bin/ehrsync                     0755
  packaging/tarball/install.sh          install.sh                      0755
  packaging/tarball/uninstall.sh        uninstall.sh                    0755
  systemd/ehrsync.service               systemd/ehrsync.service         0644
  systemd/ehrsync.sysusers              systemd/ehrsync.sysusers        0644
  config/ehrsync.toml                   config/ehrsync.toml             0644
  config/prometheus/alerts.yml          config/prometheus/alerts.yml    0644
  config/prometheus/prometheus.yml      config/prometheus/prometheus.yml 0644
  config/views/patient_demographics.json config/views/patient_demographics.json 0644
  config/views/patient_contacts.json    config/views/patient_contacts.json 0644
  config/views/appointments.json        config/views/appointments.json  0644
  README.md                             README.md                       0644
  LICENSE                               LICENSE                         0644
  CHANGELOG.md                          CHANGELOG.md                    0644
)
shopt -s nullglob
docs=(docs/*.md docs/*.png)
shopt -u nullglob
[ ${#docs[@]} -gt 0 ] || die "no documentation in docs/"
for doc in "${docs[@]}"; do
  files+=("$doc" "$doc" 0644)
done

# install.sh installs the binary where the unit's ExecStart= runs it.
grep -qx 'ExecStart=/usr/local/bin/ehrsync run --config /etc/ehrsync/ehrsync.toml' \
  systemd/ehrsync.service \
  || die "systemd/ehrsync.service must run ExecStart=/usr/local/bin/ehrsync run --config /etc/ehrsync/ehrsync.toml, where install.sh puts the binary and config"

# The timestamp is the last commit's, so the archive should hold committed files.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  sources=()
  for ((i = 3; i < ${#files[@]}; i += 3)); do sources+=("${files[i]}"); done
  dirty=$(git status --porcelain -- "${sources[@]}" 2>/dev/null || true)
  if [ -n "$dirty" ]; then
    echo "tarball/build: warning: uncommitted changes go into the archive, dated as the last commit:" >&2
    printf '%s\n' "$dirty" | sed 's/^/  /' >&2
  fi
fi

mkdir -p "$DIST"
stage=$(mktemp -d "${TMPDIR:-/tmp}/ehrsync-tarball.XXXXXX")
trap 'rm -rf "$stage"' EXIT
top=$stage/$name
mkdir -m 0755 "$top"

for ((i = 0; i < ${#files[@]}; i += 3)); do
  src=${files[i]} dest=${files[i + 1]} mode=${files[i + 2]}
  [ -f "$src" ] || die "missing $src"
  mkdir -p "$top/$(dirname "$dest")"
  cp -- "$src" "$top/$dest"
  chmod "$mode" "$top/$dest"
done
# Debug symbols and the symbol table are not needed to run it (and stripping a stripped
# binary changes nothing, so the archive stays reproducible).
strip --strip-all "$top/bin/ehrsync"
info=$(file -b "$top/bin/ehrsync")
case $info in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) die "the stripped copy is not statically linked: $info" ;;
esac
"$top/bin/ehrsync" --version >/dev/null || die "the stripped binary does not run"
find "$top" -type d -exec chmod 0755 {} +

# GNU tar format stores only the modification time; --sort=name fixes the order; gzip -n
# leaves out the file name and time that would otherwise differ between builds.
tmp_archive=$archive.tmp
tar --create --format=gnu --sort=name \
    --owner=0 --group=0 --numeric-owner \
    --mtime="@$epoch" \
    -C "$stage" "$name" \
  | gzip -9 -n > "$tmp_archive"
mv -f -- "$tmp_archive" "$archive"

size_bin=$(stat -c %s "$top/bin/ehrsync")
size_archive=$(stat -c %s "$archive")
echo "tarball/build: $archive ($size_archive bytes; bin/ehrsync $size_bin bytes, $info)"
echo "tarball/build: $(tar -tzf "$archive" | wc -l) entries, dated $(date -u -d "@$epoch" '+%Y-%m-%d %H:%M:%S UTC')"
