"""Locust load for service/perf/ab.sh: LT_N images per request (1), LT_MODE json|raw, LT_RATE req/s per user (0 = closed loop)."""
import json, os, numpy as np
from locust import FastHttpUser, task, constant, constant_throughput
rng = np.random.default_rng(0)
N = int(os.environ.get("LT_N", "1"))
MODE = os.environ.get("LT_MODE", "json")
RATE = float(os.environ.get("LT_RATE", "0"))  # per-user requests/s; 0 = closed loop
BODY = json.dumps({"images": rng.random((N, 28, 28)).round(6).tolist()}).encode()
RAW = rng.random((N, 1, 28, 28), dtype=np.float32).tobytes()
class U(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE else constant(0)
    @task
    def predict(self):
        if MODE == "json":
            self.client.post("/predict", data=BODY, headers={"Content-Type": "application/json"})
        else:
            self.client.post("/predict", data=RAW, headers={"Content-Type": "application/octet-stream"})
