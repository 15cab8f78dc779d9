"""`python -m loadtest.baselines SETUP --model M --port P`: the servers `python -m loadtest bench` compares ours with
(docs/loadtest.md). The peers run from their own venvs (numpy, onnxruntime, the peer): nothing else at the top."""
import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

MAX_BATCH = 8  # Triton's and TorchServe's batch cap (dynamic batching takes what is queued, up to this)
MAX_IMAGES = 1024  # naive FastAPI's request cap


def free_port() -> int:
    from common.procs import free_port  # (not at the top: TorchServe's worker imports this file)

    return free_port()


def session(model: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def labels_of(sess) -> list | None:
    """The contract's labels (JSON in the ONNX metadata), None for a model without them."""
    return json.loads(sess.get_modelmeta().custom_metadata_map.get("labels", "null"))


def name_of(sess) -> str:
    """The contract's model name (a plain string in the ONNX metadata), as /metadata says it."""
    return sess.get_modelmeta().custom_metadata_map.get("name", "model")


def run(sess, x: np.ndarray) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def naive_app():
    """FastAPI + onnxruntime as most people write it first: the body as JSON (pydantic-typed) or .npy, the call in
    FastAPI's thread pool, softmax in numpy; /predict only (uvicorn's factory, one per worker process)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel

    class PredictRequest(BaseModel):
        images: list[list[list[float]]] | list[list[list[list[float]]]]

    sess = session(os.environ["NAIVE_MODEL"], int(os.environ["NAIVE_THREADS"]))
    labels, shape, app = labels_of(sess), tuple(sess.get_inputs()[0].shape[1:]), FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-npy"):
            x = np.load(io.BytesIO(body), allow_pickle=False).astype(np.float32)
        else:
            x = np.asarray(PredictRequest.model_validate_json(body).images, dtype=np.float32)
        if x.size == len(x) * np.prod(shape):  # [N,H,W] for one-channel models
            x = x.reshape(len(x), *shape)
        if x.shape[1:] != shape or not 1 <= len(x) <= MAX_IMAGES:
            return JSONResponse({"error": f"images must be [N,{','.join(map(str, shape))}], 1<=N<={MAX_IMAGES}"},
                                status_code=422)
        outputs = await run_in_threadpool(run, sess, x)
        if labels is None:
            return {"outputs": {name: out.tolist() for name, out in outputs.items()}}
        logits = next(iter(outputs.values()))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return {"predictions": [{"label": labels[int(p.argmax())], "class_id": int(p.argmax()),
                                 "probabilities": p.tolist()} for p in probs]}

    return app


def naive_fastapi(a) -> None:
    import uvicorn

    os.environ.update(NAIVE_MODEL=a.model, NAIVE_THREADS=str(a.threads))
    uvicorn.run("loadtest.baselines:naive_app", factory=True, workers=a.workers, host="127.0.0.1", port=a.port,
                log_level="warning")


def do_nothing(a) -> None:
    """Raw ASGI: drains the body, answers class 0 (no outputs for a model that is not a classifier) after
    --delay-ms, runs nothing: what the load generator itself can push through HTTP here."""
    import uvicorn

    labels = labels_of(session(a.model, 1))
    body = json.dumps({"predictions": [{"label": labels[0], "class_id": 0, "probabilities": [1 / len(labels)]
                                        * len(labels)}]} if labels else {"outputs": {}}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send):
        while (await receive()).get("more_body", False):  # drain the body, as any real server must
            pass
        if a.delay_ms > 0:
            await asyncio.sleep(a.delay_ms / 1000)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False, lifespan="off")


def triton(a) -> None:
    """PyTriton: W model instances, its dynamic batcher."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    # Triton's Python stub links a libpython3.11: this interpreter's own, not the system's (whose stdlib differs)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                                  os.environ.get("LD_LIBRARY_PATH")]))
    sessions = [session(a.model, a.threads) for _ in range(a.workers)]
    s = sessions[0]
    tensor = lambda t: Tensor(name=t.name, dtype=np.float32,  # noqa: E731
                              shape=tuple(d if isinstance(d, int) else -1 for d in t.shape[1:]))
    config = TritonConfig(http_address="127.0.0.1", http_port=a.port, grpc_address="127.0.0.1", grpc_port=free_port(),
                          allow_metrics=False)
    with Triton(config=config) as server:
        infer = [batch(lambda sess=sess, **x: run(sess, *x.values())) for sess in sessions]  # an instance each
        server.bind(name_of(s), infer, inputs=[tensor(s.get_inputs()[0])],
                    outputs=[tensor(o) for o in s.get_outputs()],
                    config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher()))
        server.serve()


def torchserve(a) -> None:
    """torch-model-archiver (this file as the handler, the model as an extra file), then torchserve in the
    foreground with W workers and its batching (exec: its process group is the benchmark's to stop)."""
    bin_dir, work = os.path.dirname(sys.executable), a.work or tempfile.mkdtemp(prefix="torchserve-")
    subprocess.run([os.path.join(bin_dir, "torch-model-archiver"), "--model-name", "model", "--version", "1.0",
                    "--handler", os.path.abspath(__file__), "--extra-files", a.model, "--export-path", work,
                    "--archive-format", "no-archive", "--force"], check=True)
    models = {"model": {"1.0": {"defaultVersion": True, "marName": "model", "minWorkers": a.workers, "maxWorkers":
                                a.workers, "batchSize": MAX_BATCH, "maxBatchDelay": 1, "responseTimeout": 120}}}
    with open(os.path.join(work, "config.properties"), "w") as f:  # answers up to 1 GiB (YOLOv8n's JSON: 8 MB)
        f.write(f"inference_address=http://127.0.0.1:{a.port}\nmanagement_address=http://127.0.0.1:{free_port()}\n"
                f"metrics_address=http://127.0.0.1:{free_port()}\ndisable_token_authorization=true\n"
                f"default_workers_per_model={a.workers}\nmax_response_size={1 << 30}\nmodels={json.dumps(models)}\n")
    os.environ.update(PEER_THREADS=str(a.threads), PEER_MODEL=os.path.basename(a.model), LOG_LOCATION=work,
                      METRICS_LOCATION=work)  # (else logs/ in the working directory)
    os.execv(os.path.join(bin_dir, "torchserve"), ["torchserve", "--start", "--foreground", "--ncs", "--model-store",
                                                   work, "--ts-config", os.path.join(work, "config.properties"),
                                                   "--models", "model=model", "--disable-token-auth"])


SESSION = {}


def handle(data, context):
    """TorchServe's entry point: a batch of requests, each one .npy body, one JSON answer each."""
    if data is None:
        return None
    if "s" not in SESSION:
        model = os.path.join(context.system_properties["model_dir"], os.environ.get("PEER_MODEL", "model.onnx"))
        SESSION["s"] = session(model, int(os.environ.get("PEER_THREADS", "1")))
    xs = [np.load(io.BytesIO(bytes(r.get("body") or r.get("data"))), allow_pickle=False) for r in data]
    out, ends = run(SESSION["s"], np.concatenate(xs)), np.cumsum([len(x) for x in xs])
    return [json.dumps({k: v[end - len(x):end].tolist() for k, v in out.items()}) for x, end in zip(xs, ends)]


try:  # KServe's and LitServe's worker processes unpickle the model: its class lives at module level
    from kserve import Model as KServeModel
except ImportError:
    KServeModel = object
try:
    from litserve import LitAPI
except ImportError:
    LitAPI = object


class OnnxModel(KServeModel):
    """KServe's Python model server: W workers, one request per call, OIP v2 binary tensors both ways."""

    def __init__(self, model: str, threads: int):
        self.model, self.threads = model, threads
        super().__init__(name_of(session(model, 1)))
        self.load()

    def load(self) -> bool:
        self.sess, self.ready = session(self.model, self.threads), True
        return True

    def __getstate__(self) -> dict:  # a session does not pickle: each worker makes its own
        return {k: v for k, v in self.__dict__.items() if k != "sess"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload, headers=None):
        from kserve import InferOutput, InferResponse

        outs = []
        for k, v in run(self.sess, payload.inputs[0].as_numpy()).items():
            outs.append(InferOutput(name=k, shape=list(v.shape), datatype="FP32"))
            outs[-1].set_data_from_numpy(v, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=outs, response_id=payload.id, use_binary_outputs=True)


class LitOnnx(LitAPI):
    """LitServe: W inference workers, one request per call, JSON with the .npy in base64."""

    def __init__(self, model: str, threads: int):
        super().__init__()
        self.model, self.threads = model, threads

    def setup(self, device) -> None:
        self.sess = session(self.model, self.threads)

    def decode_request(self, request: dict) -> np.ndarray:
        return np.load(io.BytesIO(base64.b64decode(request["npy"])), allow_pickle=False)

    def predict(self, x: np.ndarray) -> dict:
        return run(self.sess, x)

    def encode_response(self, out: dict) -> dict:
        return {k: v.tolist() for k, v in out.items()}


def kserve(a) -> None:
    from kserve import ModelServer

    ModelServer(http_port=a.port, grpc_port=free_port(), enable_grpc=False, workers=a.workers).start(
        [OnnxModel(a.model, a.threads)])


def litserve(a) -> None:
    import litserve as ls

    ls.LitServer(LitOnnx(a.model, a.threads), accelerator="cpu", devices=1, workers_per_device=a.workers,
                 timeout=120).run(host="127.0.0.1", port=a.port, num_api_servers=1, generate_client_file=False,
                                  log_level="warning")


SERVERS = {"naive-fastapi": naive_fastapi, "do-nothing": do_nothing, "triton": triton, "torchserve": torchserve,
           "kserve": kserve, "litserve": litserve}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m loadtest.baselines", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("server", choices=SERVERS)
    ap.add_argument("--model", required=True, help="the contract ONNX file")
    ap.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    ap.add_argument("--workers", type=int, default=1, help="worker processes / model instances")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of each")
    ap.add_argument("--work", default=None, help="TorchServe's model store and logs (default: a new temp folder)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="do-nothing: wait this long before each answer")
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        raise SystemExit(f"error: model not found: {args.model}")
    args.model = os.path.abspath(args.model)
    SERVERS[args.server](args)
