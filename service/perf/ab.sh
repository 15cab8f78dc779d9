#!/bin/bash
# A/B throughput of server set-ups, one after another, same locust load (README.md, "Serving").
#   flock /tmp/cpu-bench.lock service/perf/ab.sh SECONDS VARIANT...
# VARIANT: `ceiling` (loadtest's do-nothing), `naive` (naive FastAPI), `naivebento` (naive BentoML),
# or NAME[:ENV=v,ENV=v] = this service with those settings. MODEL_PATH picks the model.
# Client: locust, 32 FastHttpUsers, single-image JSON (LT_N / LT_MODE / LT_RATE: see locustfile.py).
set -u
T=$1; shift
cd "$(dirname "$0")/../.."
MODEL_PATH=${MODEL_PATH:-artifacts/model.onnx}; PORT=${PORT:-3117}; USERS=${USERS:-32}
for v in "$@"; do
  name=${v%%:*}; envs=${v#*:}; [ "$envs" = "$v" ] && envs=""
  case $name in
    ceiling) argv=(.venv/bin/python -m loadtest.baselines.do_nothing --port $PORT) ;;
    naive) argv=(.venv/bin/python -m loadtest.baselines.naive_fastapi --model "$MODEL_PATH" --port $PORT) ;;
    naivebento) argv=(.venv/bin/bentoml serve loadtest.baselines.naive_bentoml:NaiveClassifier --host 127.0.0.1 --port $PORT) ;;
    *) argv=(.venv/bin/bentoml serve service.service:FashionMNISTClassifier --host 127.0.0.1 --port $PORT) ;;
  esac
  env $(echo "$envs" | tr ',' ' ') MODEL_PATH="$MODEL_PATH" BENTOML_DO_NOT_TRACK=true setsid "${argv[@]}" > /tmp/ab_$name.log 2>&1 &
  SPID=$!
  for i in $(seq 120); do
    curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -d '{"images": [[[0.5]]]}' localhost:$PORT/predict && break; sleep 0.25
  done
  sleep 1
  echo -n "$name [$envs]: "
  # locust's summary: the request-count line (reqs, fails, avg/min/max/median ms, req/s) and
  # the percentile line (50% 66% 75% 80% 90% 95% 98% 99% 99.9% 99.99% 100%, ms)
  echo; .venv/bin/locust -f service/perf/locustfile.py --headless -u $USERS -r $USERS -t ${T}s -H http://127.0.0.1:$PORT --only-summary 2>&1 \
    | grep -E "^POST" | head -2 | tr -s ' '
  kill -- -$SPID 2>/dev/null; sleep 1; kill -9 -- -$SPID 2>/dev/null; wait $SPID 2>/dev/null
done
