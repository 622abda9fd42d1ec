# Shared helpers for scripts/test and scripts/services/*.sh. Sourced, not run.
# Every service a test needs is started by a file in scripts/services/ that
# defines a start function and appends its name to SERVICES; scripts/test
# calls them in order. Each start function installs what it needs (loudly
# failing when it cannot), starts the service on a free loopback port,
# registers its PIDs for cleanup and exports the variables the tests read.

SERVICES=()
STARTED_PIDS=()
RUN_DIR="${RUN_DIR:-$PWD/.services}"
APT_UPDATED=""

log() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[test] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# A TCP port nobody listens on right now, on 127.0.0.1. Chosen below the
# kernel's ephemeral range (32768-60999 by default), where bind(0) and
# outgoing connections take theirs, so nothing else grabs it between the
# choice and the service binding it; never handed out twice in one run
# ($RUN_DIR/ports-given). Callers that can still lose a race retry (see
# redis_spawn).
free_port() {
  mkdir -p "$RUN_DIR"
  python3 - "$RUN_DIR/ports-given" <<'PY'
import random, socket, sys
given_path = sys.argv[1]
try:
    given = set(open(given_path).read().split())
except OSError:
    given = set()
low, _high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
candidates = list(range(20000, low)) if low > 21000 else []
random.shuffle(candidates)
port = None
for candidate in candidates[:500]:
    if str(candidate) in given:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", candidate))
    except OSError:
        continue
    finally:
        s.close()
    port = candidate
    break
if port is None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
with open(given_path, "a") as f:
    f.write(f"{port}\n")
print(port)
PY
}

# wait_port PORT [SECONDS]: until something accepts connections there.
wait_port() {
  local port=$1 limit=${2:-20} i
  for ((i = 0; i < limit * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

register_pid() { STARTED_PIDS+=("$1"); }

stop_services() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}

# apt_install PKG...: installs Debian packages not yet present.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# apt_install_no_start PKG...: apt_install for packages (nginx, varnish)
# whose Debian scripts would start system services on ports 80 and 6081:
# policy-rc.d forbids that while they install; a run needs none of them.
apt_install_no_start() {
  local missing=0 p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing=1
  done
  [ "$missing" = 0 ] && return 0
  if [ -e /usr/sbin/policy-rc.d ] || [ "$(id -u)" != 0 ]; then
    apt_install "$@"
    return 0
  fi
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  local rc=0
  (apt_install "$@") || rc=$?
  rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get install $* failed"
  APT_UPDATED=1
}

# pip_install CMD SPEC: installs the PyPI package SPEC unless CMD is on PATH.
pip_install() {
  local cmd=$1 spec=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  log "pip install $spec"
  python3 -m pip install -q --disable-pip-version-check "$spec" || die "pip install $spec failed"
  hash -r
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd not on PATH after pip install $spec"
}

# npm_install PACKAGE VERSION BIN: PACKAGE@VERSION from npm into
# "$RUN_DIR/PACKAGE-npm" (kept between runs; reinstalled when the pinned
# version changes), install scripts skipped. Sets NPM_BIN to the path of
# its executable BIN.
npm_install() {
  local package=$1 version=$2 prefix="$RUN_DIR/$1-npm"
  NPM_BIN="$prefix/node_modules/.bin/$3"
  if [ -x "$NPM_BIN" ] && grep -q "\"version\": \"$version\"" \
    "$prefix/node_modules/$package/package.json" 2>/dev/null; then
    return 0
  fi
  command -v node >/dev/null || die "node not found: install Node.js (apt-get install nodejs npm) for $package"
  command -v npm >/dev/null || die "npm not found: install npm for $package"
  log "npm install $package@$version"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --no-save --ignore-scripts --loglevel=error \
    "$package@$version" >"$prefix.log" 2>&1 \
    || { tail -n 20 "$prefix.log" >&2; die "npm install $package@$version failed"; }
  [ -x "$NPM_BIN" ] || die "$3 not found at $NPM_BIN after npm install"
}

# need_disk GB: fail now, naming the figure, unless the file system holding
# the build directories has room for a run that needs GB gigabytes from
# scratch (less what is already built under target/ and fuzz/target/).
# Running out of disk half-way through a compile fails the run anyway, with
# a message that points nowhere.
need_disk() {
  local need_kb=$(($1 * 1024 * 1024)) built_kb=0 free_kb
  if [ -d target ] || [ -d fuzz/target ]; then
    built_kb=$(du -sk target fuzz/target 2>/dev/null | awk '{s += $1} END {print s + 0}')
  fi
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ $((free_kb + built_kb)) -lt "$need_kb" ]; then
    die "not enough disk: a run from scratch writes about $1 GB (builds and the services it installs); $((free_kb / 1024)) MB free on $(df -P . | awk 'NR == 2 {print $6}') and $((built_kb / 1024)) MB already built"
  fi
}
