# A DynamoDB-compatible server for the tests: dynalite (npm), in memory, on
# a free loopback port. Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_DYNAMODB_ENDPOINT   http://127.0.0.1:PORT (the running server)
#   CACHEGATE_TEST_DYNALITE            path of the dynalite executable, for
#                                      tests that start (and stop) a server of
#                                      their own
# Tests set their region and dummy static credentials themselves; nothing
# AWS_* is exported here.
#
# Why dynalite and not moto's server (both pass every test here: dynalite
# 4.0.0, moto 5.2.1, checked by pointing CACHEGATE_TEST_DYNAMODB_ENDPOINT at
# `moto_server -H 127.0.0.1 -p PORT`):
# - dynalite sizes items the way DynamoDB does (binary attributes by their
#   decoded bytes, attribute names included) and rejects them over 400 KB
#   (409,600 bytes), DynamoDB's documented limit; moto uses its own cut-off
#   of 405,000 bytes.
# - dynalite takes a per-item lock around every conditional write, so a
#   conditional put is atomic by design (our lock relies on it); moto's
#   threaded server has no such lock and is atomic only as far as Python's
#   GIL happens to make it (no double winner seen in 5 x 48 contenders).
# - dynalite keeps a new table CREATING for a while (createTableMs), as
#   DynamoDB does, which exercises init's wait for ACTIVE; moto is ACTIVE
#   at once.
# - dynalite installs in about 2 s and starts in 0.2 s (the stop test
#   starts a server of its own); moto takes about 20 s to install.
# - moto has the TTL calls; dynalite has not (see below).
#
# Where dynalite differs from DynamoDB, and how the tests cover it:
# - No UpdateTimeToLive (DescribeTimeToLive always says DISABLED):
#   ensure_table reports TtlState::Unsupported and logs a warning (the
#   enable path runs against moto only, by hand); the tests check the `ttl`
#   attribute itself on stored items (epoch seconds, at or after the expiry).
# - Expired items are never deleted (DynamoDB deletes them lazily, often
#   hours late): the backend checks the expiry on every read, and a test
#   reads an item whose expiry has passed while it is still in the table.
# - No throttling, no capacity limits, no eventual consistency (every read
#   is consistent): throttling only exists as the SDK's retry config; the
#   backend reads chunks with ConsistentRead and writes them before the
#   value item that names them, which the chunk race test checks for order
#   only, not for replication lag.
# - Latency is loopback latency, not the service's.

SERVICES+=(start_dynamodb)

DYNALITE_VERSION="4.0.0"

# dynalite_install: dynalite from npm (scripts/lib.sh npm_install). Install
# scripts are skipped: the only one would build classic-level (the on-disk
# LevelDB store, used with --path only), which ships prebuilt binaries for
# Linux anyway; the tests run dynalite in memory.
dynalite_install() {
  npm_install dynalite "$DYNALITE_VERSION" dynalite
  DYNALITE_BIN="$NPM_BIN"
}

start_dynamodb() {
  dynalite_install
  rm -rf "$RUN_DIR/dynamodb"
  mkdir -p "$RUN_DIR/dynamodb"
  local port
  port=$(free_port)
  "$DYNALITE_BIN" --host 127.0.0.1 --port "$port" --createTableMs 300 \
    >"$RUN_DIR/dynamodb/dynalite.log" 2>&1 &
  register_pid $!
  wait_port "$port" 30 || {
    tail -n 20 "$RUN_DIR/dynamodb/dynalite.log" >&2 || true
    die "dynalite did not listen on 127.0.0.1:$port (log: $RUN_DIR/dynamodb/dynalite.log)"
  }
  export CACHEGATE_TEST_DYNAMODB_ENDPOINT="http://127.0.0.1:$port"
  export CACHEGATE_TEST_DYNALITE="$DYNALITE_BIN"
  log "dynamodb: dynalite $DYNALITE_VERSION at $CACHEGATE_TEST_DYNAMODB_ENDPOINT"
}
