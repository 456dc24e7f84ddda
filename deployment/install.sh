#!/usr/bin/env bash
# Install cryptobot as a systemd service. Idempotent: running it again changes nothing that is already right.
#
#   sudo deployment/install.sh             # install (or update) from this checkout
#   deployment/install.sh --dry-run        # print what it would do, change nothing
#   deployment/install.sh --root DIR       # stage into DIR instead of / (no user creation, no systemctl)
#   deployment/install.sh --skip-venv      # do not (re)build /opt/cryptobot/venv
#
# Layout: code in /opt/cryptobot/src, venv in /opt/cryptobot/venv, state in /var/lib/cryptobot (0700, owned by
# the cryptobot system user), secrets in /etc/cryptobot/cryptobot.env (0600, root-owned; read by systemd).
set -euo pipefail

DRY=0; ROOT=""; SKIP_VENV=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    --skip-venv) SKIP_VENV=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SRC="$(cd "$(dirname "$0")/.." && pwd)"
USER_NAME=cryptobot
OPT="$ROOT/opt/cryptobot"; STATE="$ROOT/var/lib/cryptobot"; ETC="$ROOT/etc/cryptobot"
UNITS="$ROOT/etc/systemd/system"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

run() { if [ "$DRY" = 1 ]; then echo "would: $*"; else echo "+ $*"; "$@"; fi; }

if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or use --dry-run / --root DIR" >&2; exit 1
fi

# 1. the dedicated system user (no login shell, no home)
if [ -z "$ROOT" ]; then
  if id -u "$USER_NAME" >/dev/null 2>&1; then echo "ok: user $USER_NAME exists"
  else run useradd --system --no-create-home --home-dir /var/lib/cryptobot --shell /usr/sbin/nologin "$USER_NAME"; fi
fi

# 2. directories
run install -d -m 0755 "$OPT" "$UNITS"
run install -d -m 0700 "$STATE"
run install -d -m 0750 "$ETC"
if [ -z "$ROOT" ]; then run chown "$USER_NAME:$USER_NAME" "$STATE"; fi

# 3. code: a fresh copy of the checkout (without the venv, data, reports, state or secrets) replaces the old
#    one whole, so files deleted from the project do not linger
run rm -rf "$OPT/src.new"
run mkdir -p "$OPT/src.new"
run tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./reports --exclude=./var \
    --exclude=./.env --exclude='*.pyc' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
    -cf "$OPT/src.tar" .
run tar -C "$OPT/src.new" -xf "$OPT/src.tar"
run rm -rf "$OPT/src.tar" "$OPT/src"
run mv "$OPT/src.new" "$OPT/src"

# 4. the venv (the runner needs the base install; the audit needs the research extra)
if [ "$SKIP_VENV" = 0 ]; then
  [ -x "$OPT/venv/bin/python" ] || run "$PYTHON" -m venv "$OPT/venv"
  run "$OPT/venv/bin/python" -m pip install --quiet --upgrade pip
  run "$OPT/venv/bin/python" -m pip install --quiet -e "$OPT/src[research]"
fi

# 5. the environment file: created once from .env.example, never overwritten (it holds your keys)
if [ -f "$ETC/cryptobot.env" ]; then echo "ok: $ETC/cryptobot.env exists (left as it is)"
else
  run install -m 0600 "$SRC/.env.example" "$ETC/cryptobot.env"
  echo "next: put your settings and keys in $ETC/cryptobot.env (mode 0600)"
fi

# 6. units
for unit in cryptobot.service cryptobot-audit.service cryptobot-audit.timer; do
  if cmp -s "$SRC/deployment/$unit" "$UNITS/$unit" 2>/dev/null; then echo "ok: $unit up to date"
  else run install -m 0644 "$SRC/deployment/$unit" "$UNITS/$unit"; fi
done
if [ -z "$ROOT" ]; then
  run systemctl daemon-reload
  run systemctl enable cryptobot-audit.timer
fi
if [ "$DRY" = 1 ]; then echo "dry run: nothing was changed"
else echo "installed. Start trading (paper unless GO_LIVE=true): systemctl enable --now cryptobot"; fi
