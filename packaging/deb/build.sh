#!/usr/bin/env bash
# Builds $DIST/ehrsync_$VERSION-1_amd64.deb with cargo-deb from the static binary .ci/package
# built (target/x86_64-unknown-linux-musl/release/ehrsync). Run by .ci/package, from the
# repository's root, with VERSION and DIST set. The package's contents are configured in
# Cargo.toml ([package.metadata.deb]); this script writes the two files that differ from the
# repository's: the unit with ExecStart= at /usr/bin (a package's place, where a hand install
# uses /usr/local/bin) and a Debian changelog.
set -euo pipefail
: "${VERSION:?}" "${DIST:?}"
LINUX_TARGET=x86_64-unknown-linux-musl
out=target/packaging/deb
units=$out/units

if [ ! -x "target/$LINUX_TARGET/release/ehrsync" ]; then
  echo "deb: target/$LINUX_TARGET/release/ehrsync is missing: run bash .ci/package" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$units"
sed 's#^ExecStart=/usr/local/bin/ehrsync #ExecStart=/usr/bin/ehrsync #' \
  systemd/ehrsync.service > "$units/ehrsync.service"
if ! grep -q '^ExecStart=/usr/bin/ehrsync run ' "$units/ehrsync.service"; then
  echo "deb: systemd/ehrsync.service has no ExecStart=/usr/local/bin/ehrsync line to rewrite" >&2
  exit 1
fi
cp systemd/ehrsync.sysusers "$units/ehrsync.sysusers"

# The commit's time, so that building the same commit twice gives the same package.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
commit=${EHRSYNC_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
cat > "$out/changelog" <<CHANGELOG
ehrsync ($VERSION-1) unstable; urgency=medium

  * ehrsync $VERSION, built from commit $commit. What changed is in
    /usr/share/doc/ehrsync/changelog.gz.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGELOG

cargo deb --no-build --target "$LINUX_TARGET" --output "$DIST/ehrsync_${VERSION}-1_amd64.deb"
