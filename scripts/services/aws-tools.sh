# The AWS tools the tests run offline: cfn-lint and the SAM CLI (for
# tests/template.rs) and cargo-lambda (builds and emulates the Lambda
# function). All from PyPI; nothing is started and nothing reaches AWS.
# Sourced by scripts/test after scripts/lib.sh.
#
# Exports:
#   CACHEGATE_TEST_CFN_LINT   absolute path of cfn-lint (at least $CFN_LINT_MIN)
#   CACHEGATE_TEST_SAM        absolute path of the SAM CLI (`sam`)
#   SAM_CLI_TELEMETRY=0       so no sam run tries to send telemetry
# cargo-lambda is only installed (on PATH as `cargo-lambda`, used as
# `cargo lambda ...`); the tests that use it find it there.
#
# cfn-lint's verdicts move with its version (new rules, new resource
# schemas), so an older cfn-lint already on the machine is upgraded: the
# template must lint clean with the same rules everywhere. The SAM CLI pins
# cfn-lint to a range (aws-sam-cli 1.170: >=1.52,<1.59), so an upgrade asks
# pip for both together and lets it pick a cfn-lint that satisfies both.

SERVICES+=(start_aws_tools)

CFN_LINT_MIN="1.58"

# version_at_least HAVE WANT: true when version HAVE >= WANT.
version_at_least() {
  [ "$(printf '%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

cfn_lint_version() {
  cfn-lint --version 2>/dev/null | awk '{print $2}'
}

start_aws_tools() {
  command -v python3 >/dev/null || die "python3 not found: install Python 3 (with pip) for cfn-lint, sam and cargo-lambda"
  pip_install sam aws-sam-cli
  pip_install cfn-lint cfn-lint
  pip_install cargo-lambda cargo-lambda

  local have
  have=$(cfn_lint_version)
  if ! version_at_least "${have:-0}" "$CFN_LINT_MIN"; then
    log "cfn-lint ${have:-?} is older than $CFN_LINT_MIN: pip install --upgrade 'cfn-lint>=$CFN_LINT_MIN' aws-sam-cli"
    python3 -m pip install -q --disable-pip-version-check --upgrade "cfn-lint>=$CFN_LINT_MIN" aws-sam-cli \
      || die "pip install --upgrade 'cfn-lint>=$CFN_LINT_MIN' aws-sam-cli failed"
    hash -r
    have=$(cfn_lint_version)
    version_at_least "${have:-0}" "$CFN_LINT_MIN" \
      || die "cfn-lint is ${have:-missing} after the upgrade, $CFN_LINT_MIN or later is needed (is another cfn-lint first on PATH? $(command -v cfn-lint))"
  fi

  export CACHEGATE_TEST_CFN_LINT CACHEGATE_TEST_SAM
  CACHEGATE_TEST_CFN_LINT=$(command -v cfn-lint)
  CACHEGATE_TEST_SAM=$(command -v sam)
  export SAM_CLI_TELEMETRY=0
  log "aws tools: cfn-lint $have ($CACHEGATE_TEST_CFN_LINT), $(sam --version 2>/dev/null) ($CACHEGATE_TEST_SAM), $(cargo lambda -V 2>/dev/null || echo 'cargo-lambda ?')"
}
