# json-server (npm) for the test of the README's json-server recipe
# (tests/json_server_recipe.rs): the test starts a json-server of its own,
# on a free port, over a db file of its own, and stops it; this only
# installs it and says where. Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_JSON_SERVER   path of the json-server executable
#
# 0.17, not 1.x: 0.17 is the release people run (1.x is a beta with another
# CLI), and its habits are what the recipe has to cope with: every answer
# says `Cache-Control: no-cache` and `Expires: -1`.

SERVICES+=(start_json_server)

JSON_SERVER_VERSION="0.17.4"

# json_server_install: json-server from npm into "$RUN_DIR/json-server-npm"
# (kept between runs; reinstalled when the pinned version changes).
json_server_install() {
  local prefix="$RUN_DIR/json-server-npm"
  JSON_SERVER_BIN="$prefix/node_modules/.bin/json-server"
  if [ -x "$JSON_SERVER_BIN" ] && grep -q "\"version\": \"$JSON_SERVER_VERSION\"" \
    "$prefix/node_modules/json-server/package.json" 2>/dev/null; then
    return 0
  fi
  command -v node >/dev/null || die "node not found: install Node.js (apt-get install nodejs npm) for json-server"
  command -v npm >/dev/null || die "npm not found: install npm for json-server"
  log "npm install json-server@$JSON_SERVER_VERSION"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --no-save --ignore-scripts --loglevel=error \
    "json-server@$JSON_SERVER_VERSION" >"$RUN_DIR/json-server-npm.log" 2>&1 \
    || { tail -n 20 "$RUN_DIR/json-server-npm.log" >&2; die "npm install json-server@$JSON_SERVER_VERSION failed"; }
  [ -x "$JSON_SERVER_BIN" ] || die "json-server not found at $JSON_SERVER_BIN after npm install"
}

start_json_server() {
  json_server_install
  export CACHEGATE_TEST_JSON_SERVER="$JSON_SERVER_BIN"
  log "json-server: $JSON_SERVER_BIN ($("$JSON_SERVER_BIN" --version 2>&1 | head -n 1))"
}
