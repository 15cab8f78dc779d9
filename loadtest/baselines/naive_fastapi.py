"""Naive FastAPI + onnxruntime reference server: what most people would write first.

One process, one onnxruntime session with default options, a pydantic-typed body, a sync endpoint
(FastAPI runs it in its thread pool), softmax in numpy. Serves only ``/predict`` (JSON).

    python -m loadtest.baselines.naive_fastapi --model artifacts/model.onnx --port 3001
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

MAX_IMAGES = 1024


class PredictRequest(BaseModel):
    images: list[list[list[float]]] | list[list[list[list[float]]]]


def create_app(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
    input_name, shape = session.get_inputs()[0].name, tuple(session.get_inputs()[0].shape[1:])
    app = FastAPI()

    @app.post("/predict")
    def predict(req: PredictRequest):
        x = np.asarray(req.images, dtype=np.float32)
        if x.size == len(x) * np.prod(shape):  # [N,H,W] for one-channel models
            x = x.reshape(len(x), *shape)
        if x.shape[1:] != shape or not 1 <= len(x) <= MAX_IMAGES:
            return JSONResponse({"error": f"images must be [N,{','.join(map(str, shape))}], 1<=N<={MAX_IMAGES}"},
                                status_code=422)
        logits = session.run(None, {input_name: x})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return {
            "predictions": [
                {"label": labels[int(p.argmax())], "class_id": int(p.argmax()), "probabilities": p.tolist()}
                for p in probs
            ]
        }

    return app


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.baselines.naive_fastapi", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="artifacts/model.onnx", help="contract ONNX file to serve")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=3001, help="port to listen on")
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        raise SystemExit(f"error: model not found: {args.model}")
    import uvicorn

    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
