#!/usr/bin/env bash
# Runs this crate's tests against the services scripts/services/redis.sh
# starts, and stops them afterwards (scripts/test does the same for all).
#   backends/redis/test.sh [ARGS for cargo test]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
RUN_DIR="$PWD/.services/redis-only"
trap stop_services EXIT
mkdir -p "$RUN_DIR"
# shellcheck source=scripts/services/redis.sh
source scripts/services/redis.sh
start_redis
cargo test -p cachegate-redis "$@"
