#!/usr/bin/env bash
# Builds the Windows installer $DIST/ehrsync-$VERSION-x64.msi from the exe .ci/package built, with
# wixl (msitools) from packaging/windows/ehrsync.wxs, then sets with msibuild what wixl cannot
# express (see below). Run from the repository root, as .ci/package does:
#   VERSION=0.1.0 DIST=target/dist WINDOWS_EXE=target/x86_64-pc-windows-gnu/release/ehrsync.exe \
#     bash packaging/windows/build.sh
# Installs wixl and msitools (apt) when they are missing. packaging/windows/test.sh checks the result.
set -euo pipefail

: "${VERSION:?set VERSION (the version in Cargo.toml, e.g. 0.1.0)}"
: "${DIST:?set DIST (the output directory, e.g. target/dist)}"
: "${WINDOWS_EXE:?set WINDOWS_EXE (the release ehrsync.exe for x86_64-pc-windows-gnu)}"

here=packaging/windows
die() { echo "packaging/windows/build.sh: $*" >&2; exit 1; }
[ -f "$here/ehrsync.wxs" ] || die "run me from the repository root (no $here/ehrsync.wxs here)"
[ -f "$WINDOWS_EXE" ] || die "no $WINDOWS_EXE: build it first (cargo build --locked --release --target x86_64-pc-windows-gnu)"

# An MSI's ProductVersion is major.minor.build, numbers only (at most 255.255.65535), and is what
# decides whether one MSI upgrades another. A pre-release such as 0.2.0-rc.1 has none that would
# order it before 0.2.0, so it gets no MSI rather than a wrong one.
if ! [[ $VERSION =~ ^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,4})$ ]] \
  || [ "${BASH_REMATCH[1]}" -gt 255 ] || [ "${BASH_REMATCH[2]}" -gt 255 ] \
  || [ "${BASH_REMATCH[3]}" -gt 65535 ]; then
  die "VERSION=$VERSION is not an MSI product version (a.b.c, at most 255.255.65535, no pre-release)"
fi

. .ci/lib.sh   # run from the repository root
# Debian ships wixl in its own package; msibuild, msiinfo and msiextract are in msitools.
missing=()
command -v wixl >/dev/null 2>&1 || missing+=(wixl)
command -v msibuild >/dev/null 2>&1 || missing+=(msitools)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# Text files get Windows line ends, for Notepad on Windows Server 2016 and older.
crlf() { sed -e 's/\r$//' -e 's/$/\r/' "$1" > "$2"; }

# The example config, made fit for Windows: a header on where it lives and how secrets are kept
# there, and `database` commented out so that the Windows default (%ProgramData%\ehrsync\ehrsync.db)
# applies instead of /var/lib/ehrsync/ehrsync.db (which Windows would read as C:\var\lib\...).
linux_db='database = "/var/lib/ehrsync/ehrsync.db"'
windows_db="# database = 'C:\ProgramData\ehrsync\ehrsync.db'   # the default on Windows: %ProgramData%\ehrsync\ehrsync.db"
grep -qxF "$linux_db" config/ehrsync.toml \
  || die "config/ehrsync.toml no longer has the line '$linux_db': update the Windows example here"
{
  cat <<'EOF'
# ehrsync on Windows. The MSI installed this file as C:\ProgramData\ehrsync\ehrsync.toml, the config
# the service `ehrsync` runs with. Upgrades and uninstalls keep it; the untouched example is
# C:\Program Files\ehrsync\ehrsync.example.toml. After editing it, check it and start the service
# (from an elevated PowerShell):
#   & 'C:\Program Files\ehrsync\ehrsync.exe' check-config --config C:\ProgramData\ehrsync\ehrsync.toml
#   Start-Service ehrsync
# On Windows, keep secrets in files only SYSTEM, Administrators and NT SERVICE\ehrsync can read,
# e.g. client_secret = { file = "secrets/niko-secret" } (relative to this file's directory):
# a service's environment ({ env = ... }) is readable by every local user, and
# { credential = ... } is for systemd. docs\operations.md, "Install on Windows", has the steps.
#
EOF
  LINUX_DB=$linux_db WINDOWS_DB=$windows_db \
    awk '$0 == ENVIRON["LINUX_DB"] { print ENVIRON["WINDOWS_DB"]; next } { print }' config/ehrsync.toml
} > "$stage/ehrsync.lf.toml"
grep -qxF "$windows_db" "$stage/ehrsync.lf.toml" \
  || die "the Windows example config lost its database line"
crlf "$stage/ehrsync.lf.toml" "$stage/ehrsync.toml"
crlf LICENSE "$stage/LICENSE.txt"
crlf README.md "$stage/README.md"
crlf CHANGELOG.md "$stage/CHANGELOG.md"
for doc in operations configuration reference security; do
  crlf "docs/$doc.md" "$stage/$doc.md"
done

mkdir -p "$DIST"
msi="$DIST/ehrsync-$VERSION-x64.msi"
rm -f "$msi"
# wixl looks sources up relative to the current directory (and the .wxs), never by absolute path.
rel() { realpath --relative-to=. "$1"; }
wixl --arch x64 --output "$msi" \
  -D Version="$VERSION" \
  -D Exe="$(rel "$WINDOWS_EXE")" \
  -D ConfigExample="$(rel "$stage/ehrsync.toml")" \
  -D License="$(rel "$stage/LICENSE.txt")" \
  -D Readme="$(rel "$stage/README.md")" \
  -D Changelog="$(rel "$stage/CHANGELOG.md")" \
  -D DocOperations="$(rel "$stage/operations.md")" \
  -D DocConfiguration="$(rel "$stage/configuration.md")" \
  -D DocReference="$(rel "$stage/reference.md")" \
  -D DocSecurity="$(rel "$stage/security.md")" \
  "$here/ehrsync.wxs"

# What wixl 0.101 cannot say in the .wxs, set in the tables it wrote:
# - The config's component: NeverOverwrite (128: not installed where ehrsync.toml exists) +
#   Permanent (16: never removed, by an uninstall or the uninstall of an upgrade) + 64-bit (256).
# - The service is vital (0x8000 in ErrorControl): the install fails, and rolls back, when it
#   cannot be registered; error control stays "normal" (1).
# - An MSI of the same version replaces an installed one built from another commit (the upgrade
#   row's maximum becomes inclusive, 512, as WiX's AllowSameVersionUpgrades), rather than both
#   being registered side by side. Strictly newer installed versions still refuse the install.
msibuild "$msi" -q "UPDATE \`Component\` SET \`Attributes\` = 400 WHERE \`Component\` = 'Config'"
msibuild "$msi" -q "UPDATE \`ServiceInstall\` SET \`ErrorControl\` = 32769 WHERE \`ServiceInstall\` = 'ehrsync'"
upgrade_code='{2EBA6EA3-8199-4A35-AFF9-35BBF5040C29}'
msibuild "$msi" -q "DELETE FROM \`Upgrade\` WHERE \`ActionProperty\` = 'WIX_UPGRADE_DETECTED'"
msibuild "$msi" -q "INSERT INTO \`Upgrade\` (\`UpgradeCode\`, \`VersionMax\`, \`Attributes\`, \`ActionProperty\`) VALUES ('$upgrade_code', '$VERSION', 513, 'WIX_UPGRADE_DETECTED')"

# The MSI must never carry the Wine-only shim of packaging/windows/wine-shim.
if msiinfo export "$msi" File | grep -qi bcryptprimitives; then
  die "$msi carries bcryptprimitives.dll: that shim is for the Wine tests only"
fi
echo "built $msi ($(du -k "$msi" | cut -f1) KiB)"
