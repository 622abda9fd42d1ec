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

# json_server_install: json-server from npm (scripts/lib.sh npm_install).
json_server_install() {
  npm_install json-server "$JSON_SERVER_VERSION" json-server
  JSON_SERVER_BIN="$NPM_BIN"
}

start_json_server() {
  json_server_install
  export CACHEGATE_TEST_JSON_SERVER="$JSON_SERVER_BIN"
  log "json-server: $JSON_SERVER_BIN ($("$JSON_SERVER_BIN" --version 2>&1 | head -n 1))"
}
