# Varnish for the tests: the test that puts a standards-following shared
# cache in front of `cachegate serve` (tests/varnish.rs) starts a varnishd of
# its own, on a free port, with its own VCL, and stops it; this only makes
# sure varnishd is installed and says where. Sourced by scripts/test after
# scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_VARNISHD   path of the varnishd executable

SERVICES+=(start_varnish)

# varnish_install: Varnish from Debian. Its package would start a system
# varnishd on port 6081 unless /usr/sbin/policy-rc.d forbids it; when there
# is none, one that does is put in place for the install only.
varnish_install() {
  dpkg -s varnish >/dev/null 2>&1 && return 0
  if [ -e /usr/sbin/policy-rc.d ] || [ "$(id -u)" != 0 ]; then
    apt_install varnish
    return 0
  fi
  log "installing varnish with service start-up disabled (temporary /usr/sbin/policy-rc.d)"
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  local rc=0
  (apt_install varnish) || rc=$?
  rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get install varnish failed"
  # shellcheck disable=SC2034 # read by apt_install in scripts/lib.sh
  APT_UPDATED=1
}

start_varnish() {
  varnish_install
  local varnishd
  varnishd=$(command -v varnishd || echo /usr/sbin/varnishd)
  [ -x "$varnishd" ] || die "varnishd not found after installing varnish"
  export CACHEGATE_TEST_VARNISHD="$varnishd"
  log "varnishd: $varnishd ($("$varnishd" -V 2>&1 | head -n 1))"
}
