# httpbin (PyPI, served by gunicorn) for tests/httpbin.rs: a third-party
# server with its own habits about compression (`/gzip` and `/brotli`
# answer encoded whatever the client asked for, `/html` and
# `/encoding/utf8` answer uncompressed text and no `Cache-Control`). The
# test starts a gunicorn of its own on a free port and stops it; this only
# installs it and says where. Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_HTTPBIN_GUNICORN   gunicorn of a virtualenv holding httpbin
#
# A virtualenv of its own under $RUN_DIR (kept between runs, remade when
# the pinned versions change): httpbin pins Flask and Werkzeug, which
# moto's server also brings, in other versions.

SERVICES+=(start_httpbin)

HTTPBIN_SPECS=(httpbin==0.10.4 gunicorn==23.0.0)

httpbin_install() {
  local venv="$RUN_DIR/httpbin-venv" want="${HTTPBIN_SPECS[*]}"
  HTTPBIN_GUNICORN="$venv/bin/gunicorn"
  if [ -x "$HTTPBIN_GUNICORN" ] && [ "$(cat "$venv/specs" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  rm -rf "$venv"
  log "pip install ${HTTPBIN_SPECS[*]} (virtualenv $venv)"
  python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${HTTPBIN_SPECS[@]}" ||
    die "pip install ${HTTPBIN_SPECS[*]} failed"
  "$venv/bin/python" -c 'import httpbin' || die "httpbin does not import after pip install"
  [ -x "$HTTPBIN_GUNICORN" ] || die "no gunicorn in $venv after pip install"
  echo "$want" >"$venv/specs"
}

start_httpbin() {
  httpbin_install
  export CACHEGATE_TEST_HTTPBIN_GUNICORN="$HTTPBIN_GUNICORN"
  log "httpbin: $("$HTTPBIN_GUNICORN" --version 2>&1 | head -n 1), $("${HTTPBIN_GUNICORN%/gunicorn}/python" -c 'import importlib.metadata as m; print("httpbin", m.version("httpbin"))')"
}
