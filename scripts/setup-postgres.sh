#!/usr/bin/env bash
# The PostgreSQL server the queue tests start in a temporary folder (tests/test_pg_queue.py): Debian's
# postgresql package. Installs with apt-get when run as root; otherwise says what to install (those
# tests then skip, saying why). Nothing is started here: the tests run their own server.
set -uo pipefail
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "sdstudio: installing postgresql for the PostgreSQL queue tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } \
    || echo "sdstudio: could not install postgresql; the PostgreSQL queue tests will be skipped"
else
  echo "sdstudio: the PostgreSQL queue tests need Debian's postgresql (e.g. sudo apt-get install postgresql); they will be skipped"
fi
exit 0
