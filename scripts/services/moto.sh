# moto's server (PyPI `moto[server]`) as the CloudFront API for the tests of
# the edge layer (src/edge.rs): CreateDistribution, CreateInvalidation,
# ListInvalidations and GetInvalidation, `#tag` paths included. In memory,
# on a free loopback port. Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_MOTO_ENDPOINT   http://127.0.0.1:PORT (the running server)
# Tests point the SDK at it with AWS_ENDPOINT_URL_CLOUDFRONT and set a
# region and dummy static credentials themselves; nothing AWS_* is
# exported here.
#
# Where moto differs from CloudFront: invalidations complete at once (no
# InProgress period), it never answers TooManyInvalidationsInProgress or
# Throttling (the retry test puts a stand-in in front that does, once), and
# it checks neither the 3,000-paths-in-progress limit nor tag syntax.

SERVICES+=(start_moto)

start_moto() {
  pip_install moto_server 'moto[server]'
  command -v moto_server >/dev/null || die "moto_server not on PATH after pip install 'moto[server]'"
  rm -rf "$RUN_DIR/moto"
  mkdir -p "$RUN_DIR/moto"
  local port
  port=$(free_port)
  moto_server -H 127.0.0.1 -p "$port" >"$RUN_DIR/moto/moto.log" 2>&1 &
  register_pid $!
  wait_port "$port" 60 || {
    tail -n 20 "$RUN_DIR/moto/moto.log" >&2 || true
    die "moto_server did not listen on 127.0.0.1:$port (log: $RUN_DIR/moto/moto.log)"
  }
  export CACHEGATE_TEST_MOTO_ENDPOINT="http://127.0.0.1:$port"
  log "moto: $(python3 -c "import moto; print(moto.__version__)" 2>/dev/null || echo "?") at $CACHEGATE_TEST_MOTO_ENDPOINT"
}
