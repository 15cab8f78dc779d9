#!/bin/bash
# Where a worker's time goes under load: py-spy on one worker while locust drives the service.
#   flock /tmp/cpu-bench.lock service/perf/pyspy_profile.sh OUT.txt   (then: python service/perf/pyspy_summary.py OUT.txt)
set -u
OUT=$1; cd "$(dirname "$0")/../.."; PORT=${PORT:-3113}
MODEL_PATH=${MODEL_PATH:-artifacts/model.onnx} BENTOML_DO_NOT_TRACK=true setsid .venv/bin/bentoml serve service.service:FashionMNISTClassifier --host 127.0.0.1 --port $PORT > /tmp/pyspy_serve.log 2>&1 &
SPID=$!
for i in $(seq 120); do curl -sf localhost:$PORT/readyz >/dev/null && break; sleep 0.25; done
WPID=$(curl -s localhost:$PORT/metadata | .venv/bin/python -c "import sys,json; print(json.load(sys.stdin)['runtime']['pid'])")
.venv/bin/locust -f service/perf/locustfile.py --headless -u 32 -r 32 -t 14s -H http://127.0.0.1:$PORT --only-summary > /tmp/pyspy_locust.log 2>&1 &
LPID=$!
sleep 3
.venv/bin/py-spy record -p $WPID -d 8 -r 200 -f raw -o "$OUT" --nonblocking > /dev/null 2>&1
wait $LPID
kill -- -$SPID; sleep 1; kill -9 -- -$SPID 2>/dev/null; wait $SPID 2>/dev/null
