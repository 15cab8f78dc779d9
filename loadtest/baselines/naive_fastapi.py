"""Naive FastAPI + onnxruntime reference server: what most people would write first.

One onnxruntime session per uvicorn worker with default options (but --threads), the body as JSON
(pydantic-typed) or .npy, the call in FastAPI's thread pool, softmax in numpy for a classifier, every
output as lists otherwise. Serves only ``/predict``.

    python -m loadtest.baselines.naive_fastapi --model artifacts/model.onnx --port 3001 [--workers 2 --threads 1]
"""
import argparse
import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

MAX_IMAGES = 1024


class PredictRequest(BaseModel):
    images: list[list[list[float]]] | list[list[list[list[float]]]]


def create_app(model_path: str, threads: int = 0) -> FastAPI:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default, every core
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map.get("labels", "null"))
    input_name, shape = session.get_inputs()[0].name, tuple(session.get_inputs()[0].shape[1:])
    names = [o.name for o in session.get_outputs()]
    app = FastAPI()

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
        outputs = await run_in_threadpool(session.run, None, {input_name: x})
        if labels is None:
            return {"outputs": {name: out.tolist() for name, out in zip(names, outputs)}}
        e = np.exp(outputs[0] - outputs[0].max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return {"predictions": [{"label": labels[int(p.argmax())], "class_id": int(p.argmax()),
                                 "probabilities": p.tolist()} for p in probs]}

    return app


def app() -> FastAPI:  # uvicorn's factory, one per worker process
    return create_app(os.environ["NAIVE_MODEL"], int(os.environ.get("NAIVE_THREADS", "0")))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.baselines.naive_fastapi", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="artifacts/model.onnx", help="contract ONNX file to serve")
    ap.add_argument("--port", type=int, default=3001, help="port to listen on (127.0.0.1)")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per worker (0: all cores)")
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        raise SystemExit(f"error: model not found: {args.model}")
    import uvicorn

    os.environ.update(NAIVE_MODEL=os.path.abspath(args.model), NAIVE_THREADS=str(args.threads))
    uvicorn.run("loadtest.baselines.naive_fastapi:app", factory=True, workers=args.workers, host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
