"""Real serving frameworks on the same ONNX file, each as its documentation shows, for `python -m loadtest bench`.
Run from the peer's own venv (.venv-peers/NAME; the benchmark makes it):

    python -m loadtest.baselines.peers {triton,torchserve,kserve,litserve} --model M --port P --workers W --threads T

W model instances (Triton) or worker processes, each one onnxruntime session with T intra-op threads, on
127.0.0.1:P. Triton (PyTriton) batches with its dynamic batcher, TorchServe with its own batching; KServe and
LitServe serve one request per call. This file is also TorchServe's handler (`handle`). Imports nothing of the
project: a peer's venv has only numpy, onnxruntime and the peer."""
import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

MAX_BATCH = 8  # Triton's and TorchServe's batch cap (dynamic batching takes what is queued, up to this)


def session(model: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def name_of(sess) -> str:
    return sess.get_modelmeta().custom_metadata_map.get("name", "model")  # the contract's, as /metadata says


def run(sess, x: np.ndarray) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def triton(a) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    # Triton's Python stub links a libpython3.11: this interpreter's own, not the system's (whose stdlib differs)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                                  os.environ.get("LD_LIBRARY_PATH")]))
    sessions = [session(a.model, a.threads) for _ in range(a.workers)]  # one model instance each
    s = sessions[0]
    tensor = lambda t: Tensor(name=t.name, dtype=np.float32, shape=tuple(d if isinstance(d, int) else -1 for d in t.shape[1:]))  # noqa: E731
    config = TritonConfig(http_address="127.0.0.1", http_port=a.port, grpc_address="127.0.0.1", grpc_port=free_port(),
                          allow_metrics=False)
    with Triton(config=config) as server:
        server.bind(name_of(s), [batch(lambda sess=sess, **x: run(sess, *x.values())) for sess in sessions],
                    inputs=[tensor(s.get_inputs()[0])], outputs=[tensor(o) for o in s.get_outputs()],
                    config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher()))
        server.serve()


def torchserve(a) -> None:
    """torch-model-archiver (this file as the handler, the model as an extra file), then torchserve in the
    foreground with W workers (exec: its process group is the benchmark's to stop)."""
    bin_dir, work = os.path.dirname(sys.executable), a.work or tempfile.mkdtemp(prefix="torchserve-")
    subprocess.run([os.path.join(bin_dir, "torch-model-archiver"), "--model-name", "model", "--version", "1.0",
                    "--handler", os.path.abspath(__file__), "--extra-files", a.model, "--export-path", work,
                    "--archive-format", "no-archive", "--force"], check=True)
    models = {"model": {"1.0": {"defaultVersion": True, "marName": "model", "minWorkers": a.workers,
                                "maxWorkers": a.workers, "batchSize": MAX_BATCH, "maxBatchDelay": 1, "responseTimeout": 120}}}
    with open(os.path.join(work, "config.properties"), "w") as f:
        f.write(f"inference_address=http://127.0.0.1:{a.port}\nmanagement_address=http://127.0.0.1:{free_port()}\n"
                f"metrics_address=http://127.0.0.1:{free_port()}\ndisable_token_authorization=true\n"
                f"default_workers_per_model={a.workers}\nmax_response_size={1 << 30}\nmodels={json.dumps(models)}\n")
    os.environ.update(PEER_THREADS=str(a.threads), PEER_MODEL=os.path.basename(a.model), LOG_LOCATION=work,
                      METRICS_LOCATION=work)  # (else logs/ in the working directory)
    os.execv(os.path.join(bin_dir, "torchserve"), ["torchserve", "--start", "--foreground", "--ncs", "--model-store", work,
                                                   "--ts-config", os.path.join(work, "config.properties"),
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
    out, answers, i = run(SESSION["s"], np.concatenate(xs)), [], 0
    for x in xs:
        answers.append(json.dumps({k: v[i:i + len(x)].tolist() for k, v in out.items()}))
        i += len(x)
    return answers


try:  # KServe's worker processes unpickle the model: its class lives at module level
    from kserve import Model as KServeModel
except ImportError:
    KServeModel = object


class OnnxModel(KServeModel):
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


def kserve(a) -> None:
    from kserve import ModelServer

    ModelServer(http_port=a.port, grpc_port=free_port(), enable_grpc=False, workers=a.workers).start(
        [OnnxModel(a.model, a.threads)])


try:  # the same for LitServe's inference workers
    from litserve import LitAPI
except ImportError:
    LitAPI = object


class LitOnnx(LitAPI):
    def __init__(self, model: str, threads: int):
        super().__init__()
        self.model, self.threads = model, threads

    def setup(self, device) -> None:
        self.sess = session(self.model, self.threads)

    def decode_request(self, request: dict) -> np.ndarray:  # JSON {"npy": base64 of the .npy}
        return np.load(io.BytesIO(base64.b64decode(request["npy"])), allow_pickle=False)

    def predict(self, x: np.ndarray) -> dict:
        return run(self.sess, x)

    def encode_response(self, out: dict) -> dict:
        return {k: v.tolist() for k, v in out.items()}


def litserve(a) -> None:
    import litserve as ls

    ls.LitServer(LitOnnx(a.model, a.threads), accelerator="cpu", devices=1, workers_per_device=a.workers,
                 timeout=120).run(host="127.0.0.1", port=a.port, num_api_servers=1, generate_client_file=False,
                                  log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.baselines.peers", description=__doc__.splitlines()[0])
    ap.add_argument("peer", choices=["triton", "torchserve", "kserve", "litserve"])
    ap.add_argument("--model", required=True, help="the ONNX file")
    ap.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    ap.add_argument("--workers", type=int, default=2, help="model instances / worker processes")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of each")
    ap.add_argument("--work", default=None, help="TorchServe's model store and logs (default: a new temp folder)")
    a = ap.parse_args()
    a.model = os.path.abspath(a.model)
    globals()[a.peer](a)


if __name__ == "__main__":
    main()
