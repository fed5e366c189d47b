#!/bin/sh
# Installs ehrsync from this unpacked tarball, as the Debian package would, on any x86_64
# Linux: with or without systemd, without dpkg. Run it as root from the unpacked directory:
#   sh install.sh                 install, or upgrade in place (keeps config and data)
#   sh install.sh --root DIR      install into another root directory (an image, a test)
#   sh install.sh --uninstall     remove it again (see uninstall.sh --help)
# It never starts or enables the service: write the config first (it says how at the end).
set -eu

USER_NAME=ehrsync
BIN=/usr/local/bin/ehrsync
UNIT=/etc/systemd/system/ehrsync.service
SYSUSERS=/usr/lib/sysusers.d/ehrsync.conf
CONF_DIR=/etc/ehrsync
CONF=$CONF_DIR/ehrsync.toml
STATE_DIR=/var/lib/ehrsync
SHARE=/usr/local/share/ehrsync
DOC=/usr/local/share/doc/ehrsync
CREDSTORES="/etc/ehrsync/credentials /etc/credstore /etc/credstore.encrypted"

usage() {
  cat <<EOF
Usage: sh install.sh [--root DIR]
       sh install.sh --uninstall [--purge] [--root DIR]

Installs ehrsync from this directory (run as root):
  $BIN                     the static binary (replaced on upgrade)
  $UNIT     the systemd unit (not enabled, not started)
  $SYSUSERS       the system user $USER_NAME, created now
  $STATE_DIR                     database and token key (0700 $USER_NAME)
  $CONF           the config (0640 root:$USER_NAME), only if there is
                                        none; otherwise the new example goes
                                        beside it as ehrsync.toml.example
  /etc/ehrsync/credentials/       root-only systemd credentials (if absent),
  /etc/credstore{,.encrypted}/    as LoadCredential[Encrypted]= reads them
  $SHARE/              Prometheus alert rules and scrape config,
                                        uninstall.sh
  $DOC/          README, CHANGELOG, LICENSE, docs

Options:
  --root DIR    install below DIR instead of /, without touching this system: the user
                is created in DIR/etc/passwd with systemd-sysusers --root (if this
                machine has systemd-sysusers; otherwise files stay owned by root and it
                says so). systemctl is not called.
  --uninstall   run uninstall.sh from this directory with the remaining options.
  -h, --help    this text.

Running it again upgrades: the binary, unit and shared files are replaced; the config,
the data and the user stay. Back up the database first (docs/operations.md, "Upgrading").
EOF
}

say() { printf '%s\n' "$*"; }
note() { printf '  note: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || die "cannot find the directory of $0"

root=/
while [ $# -gt 0 ]; do
  case $1 in
    --root)
      [ $# -ge 2 ] || die "--root needs a directory"
      root=$2
      shift 2
      ;;
    --root=*) root=${1#--root=}; shift ;;
    --uninstall)
      shift
      [ -f "$here/uninstall.sh" ] || die "$here/uninstall.sh is missing; unpack the whole tarball again"
      exec sh "$here/uninstall.sh" "$@"
      ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'install.sh: error: unknown option %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run it as root (for example: sudo sh $0)"

# R is prepended to every installed path: empty for this system, the directory for --root.
if [ "$root" = / ]; then
  R=
else
  [ -d "$root" ] || die "--root $root is not a directory"
  R=$(CDPATH='' cd -- "$root" && pwd) || die "cannot enter $root"
  [ "$R" != / ] || R=
fi

# The files this script installs, all from the unpacked tarball.
missing=
for f in bin/ehrsync systemd/ehrsync.service systemd/ehrsync.sysusers config/ehrsync.toml \
  config/prometheus/alerts.yml config/prometheus/prometheus.yml uninstall.sh; do
  [ -f "$here/$f" ] || missing="$missing $f"
done
[ -z "$missing" ] || die "missing in $here:$missing
  (run install.sh from the unpacked ehrsync-VERSION-x86_64-linux-musl directory)"

if [ -z "$R" ]; then
  arch=$(uname -m)
  [ "$arch" = x86_64 ] || die "this build is for x86_64 Linux; this machine is $arch"
fi

# systemd is the init system when /run/systemd/system exists (what sd_booted() checks).
systemd_running=no
if [ -z "$R" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemd_running=yes
fi

umask 022
pending=
trap 'if [ -n "$pending" ]; then rm -f -- "$pending"; fi' EXIT

# put SRC DEST MODE OWNER: copy SRC to R/DEST with that mode and numeric owner (UID:GID),
# atomically (a running binary or a reader never sees half a file).
put() {
  pending=$R$2.new.$$
  cp -- "$1" "$pending"
  chown "$4" "$pending"
  chmod "$3" "$pending"
  mv -f -- "$pending" "$R$2"
  pending=
}

# dir PATH MODE OWNER: the directory R/PATH, ours, with that mode and owner.
dir() {
  mkdir -p -- "$R$1"
  chown "$3" "$R$1"
  chmod "$2" "$R$1"
}

# parent PATH: a system directory such as /usr/local/bin, created (0755 root) only if missing;
# an existing one is left as it is.
parent() {
  [ -d "$R$1" ] || mkdir -p -- "$R$1"
}

# The UID (uid_of) or GID (gid_of) of a name in R/etc/passwd or R/etc/group; on this system,
# also from the system's user database (id, getent). Empty when there is none.
uid_of() {
  awk -F: -v n="$1" '$1 == n { print $3; exit }' "$R/etc/passwd" 2>/dev/null || true
  if [ -z "$R" ]; then id -u "$1" 2>/dev/null || true; fi
}
gid_of() {
  awk -F: -v n="$1" '$1 == n { print $3; exit }' "$R/etc/group" 2>/dev/null || true
  if [ -z "$R" ] && command -v getent >/dev/null 2>&1; then
    getent group "$1" 2>/dev/null | cut -d: -f3 || true
  fi
}

nologin_shell() {
  for shell in /usr/sbin/nologin /sbin/nologin; do
    if [ -x "$R$shell" ]; then echo "$shell"; return; fi
  done
  echo /bin/false
}

upgrade=no
[ -e "$R$BIN" ] && upgrade=yes
if [ -z "$R" ]; then
  say "Installing ehrsync from $here"
else
  say "Installing ehrsync from $here into $R"
fi

# --- The binary ------------------------------------------------------------------------------
parent /usr/local/bin
put "$here/bin/ehrsync" "$BIN" 0755 0:0
say "  $BIN"

# --- The user ----------------------------------------------------------------------------------
parent /usr/lib/sysusers.d
put "$here/systemd/ehrsync.sysusers" "$SYSUSERS" 0644 0:0
say "  $SYSUSERS"

if [ -n "$(uid_of "$USER_NAME" | head -n1)" ]; then
  say "  user $USER_NAME exists"
elif [ -n "$R" ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    parent /etc
    systemd-sysusers --root="$R" "$R$SYSUSERS" \
      || die "systemd-sysusers --root=$R could not create the user $USER_NAME"
    say "  user $USER_NAME created in $R/etc/passwd (systemd-sysusers --root)"
  else
    note "no systemd-sysusers on this machine, so no user $USER_NAME in $R/etc/passwd:
    $STATE_DIR and $CONF stay owned by root. On the target system, create the user
    (systemd-sysusers, or useradd --system) and run: chown $USER_NAME:$USER_NAME $STATE_DIR;
    chgrp $USER_NAME $CONF"
  fi
elif command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers "$SYSUSERS" || die "systemd-sysusers could not create the user $USER_NAME"
  say "  user $USER_NAME created (systemd-sysusers)"
elif command -v useradd >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
    --shell "$(nologin_shell)" --comment "ehrsync EHR token and sync agent" "$USER_NAME" \
    || die "useradd could not create the user $USER_NAME"
  say "  user $USER_NAME created (useradd --system)"
elif command -v adduser >/dev/null 2>&1 && command -v addgroup >/dev/null 2>&1; then
  # BusyBox (Alpine): -S system, -D no password, -H no home directory created.
  [ -n "$(gid_of "$USER_NAME" | head -n1)" ] || addgroup -S "$USER_NAME"
  adduser -S -D -H -h "$STATE_DIR" -s "$(nologin_shell)" -G "$USER_NAME" \
    -g "ehrsync EHR token and sync agent" "$USER_NAME"
  say "  user $USER_NAME created (adduser -S)"
else
  die "cannot create the system user $USER_NAME: none of systemd-sysusers, useradd, adduser
  found. Create it yourself (home $STATE_DIR, no login shell), then run install.sh again."
fi
uid=$(uid_of "$USER_NAME" | head -n1)
gid=$(gid_of "$USER_NAME" | head -n1)
if [ -n "$uid" ] && [ -z "$gid" ]; then
  die "user $USER_NAME exists but group $USER_NAME does not; create the group, then run install.sh again"
fi
[ -n "$uid" ] || { uid=0; gid=0; }

# --- State directory ------------------------------------------------------------------------------
parent /var/lib
mkdir -p -- "$R$STATE_DIR"
chown "$uid:$gid" "$R$STATE_DIR"
chmod 0700 "$R$STATE_DIR"
say "  $STATE_DIR (0700, $USER_NAME)"

# --- Config ------------------------------------------------------------------------------------
# /etc/ehrsync: 0755 root when created; an existing one keeps the owner and mode it has.
[ -d "$R$CONF_DIR" ] || dir "$CONF_DIR" 0755 0:0
config_new=no
if [ -e "$R$CONF" ] || [ -L "$R$CONF" ]; then
  put "$here/config/ehrsync.toml" "$CONF.example" 0644 0:0
  say "  $CONF kept as it is; this release's example is $CONF.example"
else
  put "$here/config/ehrsync.toml" "$CONF" 0640 "0:$gid"
  config_new=yes
  say "  $CONF (the example: edit it)"
fi

# Root-only homes for systemd credentials (the unit's LoadCredential[Encrypted]=NAME looks
# there); left alone when they exist.
for store in $CREDSTORES; do
  if [ ! -e "$R$store" ]; then
    parent "${store%/*}"
    dir "$store" 0700 0:0
    say "  $store (0700, root)"
  fi
done

# --- systemd unit ---------------------------------------------------------------------------------
# The unit is replaced on upgrade; local changes belong in drop-ins (systemctl edit ehrsync).
# A unit that differs from the one the last install.sh put there was edited by hand: it is
# kept beside, under a name systemd ignores.
parent /etc/systemd/system
if [ -f "$R$UNIT" ] && ! cmp -s "$R$UNIT" "$here/systemd/ehrsync.service" \
  && ! { [ -f "$R$SHARE/ehrsync.service" ] && cmp -s "$R$UNIT" "$R$SHARE/ehrsync.service"; }; then
  saved=$UNIT.edited-$(date +%Y%m%d%H%M%S)
  cp -p -- "$R$UNIT" "$R$saved"
  note "$UNIT differed from the unit this release installs (edited by hand?);
    it is saved as $saved. Put local changes in a drop-in instead: systemctl edit ehrsync"
fi
put "$here/systemd/ehrsync.service" "$UNIT" 0644 0:0
say "  $UNIT"

# --- Shared files and documentation --------------------------------------------------------------
rm -rf -- "$R$SHARE" "$R$DOC"
dir "$SHARE" 0755 0:0
dir "$SHARE/prometheus" 0755 0:0
put "$here/config/prometheus/alerts.yml" "$SHARE/prometheus/alerts.yml" 0644 0:0
put "$here/config/prometheus/prometheus.yml" "$SHARE/prometheus/prometheus.yml" 0644 0:0
dir "$SHARE/views" 0755 0:0
for v in "$here"/config/views/*.json; do
  put "$v" "$SHARE/views/${v##*/}" 0644 0:0
done
put "$here/systemd/ehrsync.service" "$SHARE/ehrsync.service" 0644 0:0
put "$here/uninstall.sh" "$SHARE/uninstall.sh" 0755 0:0
say "  $SHARE/ (prometheus/alerts.yml, prometheus/prometheus.yml, views/*.json, uninstall.sh)"
dir "$DOC" 0755 0:0
for f in README.md CHANGELOG.md LICENSE; do
  if [ -f "$here/$f" ]; then put "$here/$f" "$DOC/$f" 0644 0:0; fi
done
if [ -d "$here/docs" ]; then
  dir "$DOC/docs" 0755 0:0
  for f in "$here"/docs/*; do
    if [ -f "$f" ]; then put "$f" "$DOC/docs/${f##*/}" 0644 0:0; fi
  done
fi
say "  $DOC/"

# --- CA certificates ------------------------------------------------------------------------------
# ehrsync verifies HTTPS servers against the system's CA certificates, found where OpenSSL
# looks for them; with none it cannot make any request (minimal containers, Alpine without
# ca-certificates).
ca_found=no
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem \
  /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/ca-bundle.pem /etc/pki/tls/cacert.pem \
  /etc/ssl/cert.pem /etc/ssl/certs/cacert.pem; do
  if [ -s "$R$f" ]; then ca_found=yes; break; fi
done
if [ "$ca_found" = no ] && [ -d "$R/etc/ssl/certs" ] && [ -n "$(ls -A "$R/etc/ssl/certs")" ]; then
  ca_found=yes
fi
if [ "$ca_found" = no ]; then
  note "no CA certificates in ${R:-}/etc/ssl/certs or the other usual places: ehrsync cannot
    make HTTPS requests without them (\"cannot set up the HTTP client\"). Install your
    distribution's ca-certificates package."
fi

# --- Tell systemd -------------------------------------------------------------------------------
if [ "$systemd_running" = yes ]; then
  systemctl daemon-reload
  say "  systemctl daemon-reload"
fi

if [ -z "$R" ]; then
  version=$("$BIN" --version) || die "the installed $BIN does not run"
  say "Installed $version."
else
  say "Installed into $R."
fi

# --- What next ------------------------------------------------------------------------------
run_as="runuser -u $USER_NAME --"
command -v runuser >/dev/null 2>&1 || run_as="su -s /bin/sh $USER_NAME -c"
if [ "$upgrade" = yes ] && [ "$config_new" = no ]; then
  say "
This was an upgrade: your config and data are unchanged. New config keys are in
$CONF.example and CHANGELOG.md ($DOC/CHANGELOG.md)."
  if [ "$systemd_running" = yes ] && systemctl is-active --quiet ehrsync.service; then
    say "The running service still runs the old binary: systemctl restart ehrsync"
  fi
fi
if [ "$config_new" = yes ]; then
  say "
Next steps (the service is neither enabled nor started):
  1. Edit $CONF: keep only your accounts, and point their secrets at
     systemd credentials (/etc/credstore.encrypted/NAME, named in a drop-in:
     systemctl edit ehrsync) or at files only $USER_NAME can read.
     Every key: $DOC/docs/configuration.md
  2. Check it, and the connection to each vendor:
       $run_as $BIN --config $CONF check-config
       $run_as $BIN --config $CONF doctor"
  if [ "$systemd_running" = yes ] || [ -n "$R" ]; then
    say "  3. Start it:  systemctl enable --now ehrsync"
  else
    say "  3. Start it: this system does not run systemd, so have your init system run
       $BIN run --config $CONF
     as user $USER_NAME (it logs to stderr and stops cleanly on SIGTERM)."
  fi
  say "Details: $DOC/docs/operations.md, \"Install from the static tarball (any Linux)\"."
fi
