# Redis for the tests: a standalone server, one with a password (AUTH), one
# with TLS only (a private CA + server certificate made here with openssl),
# and a 3-node Redis Cluster. Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_REDIS_URL           redis://127.0.0.1:PORT (standalone)
#   CACHEGATE_TEST_REDIS_AUTH_URL      redis://127.0.0.1:PORT (requirepass; no password in it)
#   CACHEGATE_TEST_REDIS_PASSWORD      that server's password (random per run)
#   CACHEGATE_TEST_REDIS_USERNAME      an ACL user on that server, same password,
#                                      allowed only keys matching cgacl:*
#   CACHEGATE_TEST_REDIS_TLS_URL       rediss://127.0.0.1:PORT (TLS only, no plain port)
#   CACHEGATE_TEST_REDIS_TLS_CA        PEM file of the CA that signed the server certificate
#   CACHEGATE_TEST_REDIS_CLUSTER_URL   redis://127.0.0.1:P1,redis://127.0.0.1:P2,redis://127.0.0.1:P3
#   CACHEGATE_TEST_REDIS_TLS_CLUSTER_URL  rediss://... x3: a 3-node cluster over TLS only
#                                      (clients and cluster bus), same CA
#
# Every server runs in the foreground of a background job (never daemonized)
# with persistence off, on free loopback ports; the PIDs are registered so
# stop_services kills them. Data and logs live under "$RUN_DIR/redis".

SERVICES+=(start_redis)

# redis_install: redis-server, redis-cli and openssl from Debian. Debian's
# redis-server package would start a system redis on 6379 (systemd or
# init.d) unless /usr/sbin/policy-rc.d forbids it (Docker images ship one
# that does); when there is none, one is put in place for the install only,
# so no system server appears. The tests never use 6379 either way.
redis_install() {
  local missing=0 p
  for p in redis-server redis-tools openssl; do
    dpkg -s "$p" >/dev/null 2>&1 || missing=1
  done
  [ "$missing" = 0 ] && return 0
  if [ -e /usr/sbin/policy-rc.d ] || [ "$(id -u)" != 0 ]; then
    apt_install redis-server redis-tools openssl
    return 0
  fi
  log "installing redis-server with service start-up disabled (temporary /usr/sbin/policy-rc.d)"
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  local rc=0
  (apt_install redis-server redis-tools openssl) || rc=$?
  rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get install redis-server redis-tools openssl failed"
  # shellcheck disable=SC2034 # read by apt_install in scripts/lib.sh
  APT_UPDATED=1
}

# redis_spawn NAME ARGS...: one redis-server in the background, logging to
# $RUN_DIR/redis/NAME.log (what it prints before the log is open goes to
# NAME.out), working directory $RUN_DIR/redis/NAME. In ARGS, @PORT@ and
# @BUS@ stand for free ports chosen here; when the server cannot bind one
# (another process took it after free_port looked), it is started again on
# new ports, up to five times. Sets REDIS_PORT to the port it listens on.
redis_spawn() {
  local name=$1
  shift
  local dir="$RUN_DIR/redis/$name" attempt port bus pid arg args
  mkdir -p "$dir"
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    bus=$(free_port)
    args=()
    for arg in "$@"; do
      arg=${arg//@PORT@/$port}
      args+=("${arg//@BUS@/$bus}")
    done
    rm -f "$dir/nodes.conf"
    redis-server --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
      --dir "$dir" --logfile "$RUN_DIR/redis/$name.log" "${args[@]}" \
      >>"$RUN_DIR/redis/$name.out" 2>&1 &
    pid=$!
    if redis_wait_listening "$pid" "$RUN_DIR/redis/$name.log" "$port"; then
      register_pid "$pid"
      REDIS_PORT=$port
      return 0
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    grep -q 'Address already in use' "$RUN_DIR/redis/$name.log" "$RUN_DIR/redis/$name.out" 2>/dev/null || break
    log "redis-server $name: port $port or $bus was taken after it was chosen; again on new ports (attempt $attempt)"
    : >"$RUN_DIR/redis/$name.log"
  done
  tail -n 20 "$RUN_DIR/redis/$name.out" "$RUN_DIR/redis/$name.log" >&2 2>/dev/null || true
  die "redis-server $name did not listen on 127.0.0.1:$port (log: $RUN_DIR/redis/$name.log)"
}

# redis_wait_listening PID LOG PORT: until this server (PID, still running,
# its LOG saying it is ready) accepts connections on PORT (0), or it exits
# or 20 s pass (1). The port alone is not proof: whoever took it listens too.
redis_wait_listening() {
  local pid=$1 log=$2 port=$3 i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    if grep -q 'Ready to accept connections' "$log" 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      kill -0 "$pid" 2>/dev/null && return 0
      return 1
    fi
    sleep 0.1
  done
  return 1
}

# redis_make_certs DIR: a private CA and a server certificate for
# 127.0.0.1/localhost signed by it (rustls rejects a lone self-signed
# certificate used as the server's own: CaUsedAsEndEntity). clientAuth too:
# TLS cluster nodes present it to each other on the cluster bus.
redis_make_certs() {
  local d=$1
  mkdir -p "$d"
  openssl req -x509 -new -nodes -days 3 -subj "/CN=cachegate test CA" \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$d/ca.key" -out "$d/ca.crt" >/dev/null 2>&1 || die "openssl: cannot make the test CA"
  openssl req -new -nodes -subj "/CN=localhost" \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1 || die "openssl: cannot make the server key"
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" >"$d/server.ext"
  openssl x509 -req -days 3 -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
    -CAcreateserial -extfile "$d/server.ext" -out "$d/server.crt" >/dev/null 2>&1 \
    || die "openssl: cannot sign the server certificate"
  chmod 644 "$d/server.key"
}

# redis_cluster NAME [--tls-port-only CERTDIR]: three cluster nodes on free
# ports, joined with redis-cli --cluster create (masters only), waited for
# until every node reports cluster_state:ok. Sets REDIS_CLUSTER_URLS. The
# bus ports are chosen explicitly (the default port+10000 may be taken or
# above 65535).
redis_cluster() {
  local name=$1 certs="" scheme=redis
  local cli=(redis-cli)
  if [ "${2:-}" = "--tls-port-only" ]; then
    certs=$3
    scheme=rediss
    cli=(redis-cli --tls --cacert "$certs/ca.crt")
  fi
  local nodes=() urls=() i port
  for i in 1 2 3; do
    local listen=(--port @PORT@)
    if [ -n "$certs" ]; then
      listen=(--port 0 --tls-port @PORT@ --tls-cluster yes
        --tls-cert-file "$certs/server.crt" --tls-key-file "$certs/server.key"
        --tls-ca-cert-file "$certs/ca.crt" --tls-auth-clients no)
    fi
    redis_spawn "$name-$i" "${listen[@]}" --cluster-enabled yes \
      --cluster-port @BUS@ --cluster-config-file "$RUN_DIR/redis/$name-$i/nodes.conf" \
      --cluster-node-timeout 5000
    port=$REDIS_PORT
    nodes+=("127.0.0.1:$port")
    urls+=("$scheme://127.0.0.1:$port")
  done
  "${cli[@]}" --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$RUN_DIR/redis/$name-create.log" 2>&1 \
    || { tail -n 20 "$RUN_DIR/redis/$name-create.log" >&2; die "redis-cli --cluster create ($name) failed"; }
  local node ok
  for node in "${nodes[@]}"; do
    ok=""
    for ((i = 0; i < 100; i++)); do
      if "${cli[@]}" -h 127.0.0.1 -p "${node##*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
        ok=1
        break
      fi
      sleep 0.1
    done
    [ -n "$ok" ] || die "redis $name node $node never reached cluster_state:ok"
  done
  REDIS_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")
}

start_redis() {
  redis_install
  command -v redis-server >/dev/null || die "redis-server not on PATH after install"
  command -v redis-cli >/dev/null || die "redis-cli not on PATH after install"
  redis-server --version | grep -q 'v=[67]\.\|v=[89]\.' || log "note: untested $(redis-server --version)"
  rm -rf "$RUN_DIR/redis"
  mkdir -p "$RUN_DIR/redis"

  # Standalone.
  local port
  redis_spawn standalone --port @PORT@
  port=$REDIS_PORT
  export CACHEGATE_TEST_REDIS_URL="redis://127.0.0.1:$port"

  # AUTH: the default user with a random password.
  local pass
  pass=$(openssl rand -hex 16)
  redis_spawn auth --port @PORT@ --requirepass "$pass" \
    --user cachegate on ">$pass" '~cgacl:*' '&*' +@all
  port=$REDIS_PORT
  export CACHEGATE_TEST_REDIS_AUTH_URL="redis://127.0.0.1:$port"
  export CACHEGATE_TEST_REDIS_PASSWORD="$pass"
  export CACHEGATE_TEST_REDIS_USERNAME=cachegate

  # TLS only (no plain-text port).
  local certs="$RUN_DIR/redis/certs"
  redis_make_certs "$certs"
  redis_spawn tls --port 0 --tls-port @PORT@ \
    --tls-cert-file "$certs/server.crt" --tls-key-file "$certs/server.key" \
    --tls-ca-cert-file "$certs/ca.crt" --tls-auth-clients no
  port=$REDIS_PORT
  redis-cli --tls --cacert "$certs/ca.crt" -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG \
    || die "redis-server TLS on 127.0.0.1:$port does not answer PING over TLS (log: $RUN_DIR/redis/tls.log)"
  export CACHEGATE_TEST_REDIS_TLS_URL="rediss://127.0.0.1:$port"
  export CACHEGATE_TEST_REDIS_TLS_CA="$certs/ca.crt"

  # A 3-node cluster, masters only, and the same over TLS.
  redis_cluster cluster
  export CACHEGATE_TEST_REDIS_CLUSTER_URL="$REDIS_CLUSTER_URLS"
  redis_cluster tls-cluster --tls-port-only "$certs"
  export CACHEGATE_TEST_REDIS_TLS_CLUSTER_URL="$REDIS_CLUSTER_URLS"

  log "redis: standalone $CACHEGATE_TEST_REDIS_URL, auth $CACHEGATE_TEST_REDIS_AUTH_URL, tls $CACHEGATE_TEST_REDIS_TLS_URL, cluster $CACHEGATE_TEST_REDIS_CLUSTER_URL, tls cluster $CACHEGATE_TEST_REDIS_TLS_CLUSTER_URL"
}
