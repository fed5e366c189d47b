#!/bin/sh
# Removes what install.sh installed. install.sh also leaves a copy of this script at
# /usr/local/share/ehrsync/uninstall.sh, so the tarball is not needed to uninstall.
#   sh uninstall.sh               stop and disable the service; remove the binary, unit,
#                                 sysusers file and shared files. Config, data, user stay.
#   sh uninstall.sh --purge       also delete /etc/ehrsync, /var/lib/ehrsync (the database,
#                                 patient records, token key), drop-ins, and the user.
#   sh uninstall.sh --root DIR    the same below DIR instead of /.
set -eu

USER_NAME=ehrsync
BIN=/usr/local/bin/ehrsync
UNIT=/etc/systemd/system/ehrsync.service
SYSUSERS=/usr/lib/sysusers.d/ehrsync.conf
CONF_DIR=/etc/ehrsync
STATE_DIR=/var/lib/ehrsync
SHARE=/usr/local/share/ehrsync
DOC=/usr/local/share/doc/ehrsync

usage() {
  cat <<EOF
Usage: sh uninstall.sh [--purge] [--root DIR]

Stops and disables the ehrsync service (when systemd runs), then removes
  $BIN, $UNIT,
  $SYSUSERS, $SHARE/, $DOC/.
Keeps $CONF_DIR (config, secret files), $STATE_DIR (database, token key),
drop-ins in $UNIT.d/ and the user $USER_NAME, unless --purge is given.
Credentials in /etc/credstore*/ are never touched: delete those you made for ehrsync
yourself.

Options:
  --purge       also delete $CONF_DIR, $STATE_DIR (patient records and the key that
                decrypts the stored tokens: back them up first if you may need them), the
                drop-ins, units saved by install.sh, and the user and group $USER_NAME.
  --root DIR    uninstall from below DIR instead of /; systemctl is not called, and the user
                is removed from DIR/etc/passwd, group, shadow and gshadow.
  -h, --help    this text.
EOF
}

say() { printf '%s\n' "$*"; }
die() { printf 'uninstall.sh: error: %s\n' "$*" >&2; exit 1; }

root=/
purge=no
while [ $# -gt 0 ]; do
  case $1 in
    --purge) purge=yes; shift ;;
    --root)
      [ $# -ge 2 ] || die "--root needs a directory"
      root=$2
      shift 2
      ;;
    --root=*) root=${1#--root=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'uninstall.sh: error: unknown option %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run it as root (for example: sudo sh $0)"

if [ "$root" = / ]; then
  R=
else
  [ -d "$root" ] || die "--root $root is not a directory"
  R=$(CDPATH='' cd -- "$root" && pwd) || die "cannot enter $root"
  [ "$R" != / ] || R=
fi

systemd_running=no
if [ -z "$R" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemd_running=yes
fi

if [ -z "$R" ]; then say "Uninstalling ehrsync"; else say "Uninstalling ehrsync from $R"; fi

# A graceful stop first (the unit gives running pulls their shutdown grace).
if [ "$systemd_running" = yes ] && [ -f "$UNIT" ]; then
  systemctl disable --now ehrsync.service
  say "  stopped and disabled ehrsync.service"
elif [ -z "$R" ] && command -v pidof >/dev/null 2>&1 && pids=$(pidof ehrsync); then
  say "  note: ehrsync still runs (pid $pids), started by something other than systemd; stop it"
fi

remove() {
  for path in "$@"; do
    if [ -e "$R$path" ] || [ -L "$R$path" ]; then
      rm -rf -- "$R$path"
      say "  removed $path"
    fi
  done
}

remove "$BIN" "$UNIT" "$SYSUSERS" "$SHARE" "$DOC"

if [ "$purge" = yes ]; then
  remove "$UNIT.d" "$CONF_DIR" "$STATE_DIR"
  for saved in "$R$UNIT".edited-*; do
    if [ -e "$saved" ]; then remove "${saved#"$R"}"; fi
  done
fi

if [ "$systemd_running" = yes ]; then
  systemctl daemon-reload
  say "  systemctl daemon-reload"
fi

# The user, last: nothing of it runs any more.
if [ "$purge" = yes ]; then
  if [ -n "$R" ]; then
    # Another root's account files, edited directly (no tool here may know that root).
    removed=no
    for db in passwd shadow group gshadow; do
      file=$R/etc/$db
      if [ -f "$file" ] && grep -q "^$USER_NAME:" "$file"; then
        grep -v "^$USER_NAME:" "$file" > "$file.new.$$" || true
        chmod --reference="$file" "$file.new.$$" 2>/dev/null || chmod "$(stat -c %a "$file")" "$file.new.$$"
        chown "$(stat -c %u:%g "$file")" "$file.new.$$"
        mv -f -- "$file.new.$$" "$file"
        removed=yes
      fi
    done
    if [ "$removed" = yes ]; then say "  removed user and group $USER_NAME from $R/etc"; fi
  elif id -u "$USER_NAME" >/dev/null 2>&1; then
    if command -v userdel >/dev/null 2>&1; then
      userdel "$USER_NAME"
    elif command -v deluser >/dev/null 2>&1; then
      deluser "$USER_NAME"
    else
      die "cannot remove the user $USER_NAME: no userdel or deluser; remove it yourself"
    fi
    # userdel removes the user's own group too only where USERGROUPS_ENAB says so.
    if grep -q "^$USER_NAME:" /etc/group 2>/dev/null; then
      if command -v groupdel >/dev/null 2>&1; then groupdel "$USER_NAME"
      elif command -v delgroup >/dev/null 2>&1; then delgroup "$USER_NAME"
      fi
    fi
    say "  removed user and group $USER_NAME"
  fi
  say "Purged. Credentials in /etc/credstore*/ and backups were not touched."
else
  say "Uninstalled. Kept: $CONF_DIR, $STATE_DIR (database, token key), the user $USER_NAME"
  if [ -d "$R$UNIT.d" ]; then say "  and your drop-ins in $UNIT.d/"; fi
  say "To delete them too (back up the database and key first if you may need them):
  sh uninstall.sh --purge     from the unpacked ehrsync tarball, or by hand:
  rm -rf $CONF_DIR $STATE_DIR; userdel $USER_NAME"
fi
