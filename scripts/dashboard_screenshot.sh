#!/usr/bin/env bash
# A screenshot of optuna-dashboard's study page for a run (the README's), in headless Chromium.
#   scripts/dashboard_screenshot.sh RUN_DIR OUT.png    (a run whose database is its run.db)
set -euo pipefail
run_dir=$1 out=$2
py=${PY:-.venv/bin/python}
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
profile=$(mktemp -d)
"$(dirname "$py")/optuna-dashboard" "sqlite:///$(readlink -f "$run_dir")/run.db" --host 127.0.0.1 --port "$port" \
    >/dev/null 2>&1 &
server=$!
trap 'kill $server; rm -rf "$profile"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/api/meta" >/dev/null && break
    sleep 0.2
done
chromium --headless --no-sandbox --disable-gpu --user-data-dir="$profile" --virtual-time-budget=20000 \
    --window-size=1400,1000 --screenshot="$(readlink -f "$(dirname "$out")")/$(basename "$out")" \
    "http://127.0.0.1:$port/dashboard/studies/1" 2>/dev/null
