"""Naive BentoML + onnxruntime service: one typed endpoint, every BentoML default left alone.

The BentoML quick-start shape applied to our model: ``@bentoml.service`` with no arguments, an
onnxruntime session with default options, a sync ``@bentoml.api`` typed with nested lists (BentoML
validates the body and runs the method in its thread pool). Serves only ``/predict`` (JSON).

    MODEL_PATH=artifacts/model.onnx bentoml serve loadtest.baselines.naive_bentoml:NaiveClassifier --port 3003
"""
import json
import os

import bentoml
import numpy as np


@bentoml.service
class NaiveClassifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        path = os.environ.get("MODEL_PATH", "artifacts/model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.labels = json.loads(self.session.get_modelmeta().custom_metadata_map["labels"])
        self.input_name, self.shape = self.session.get_inputs()[0].name, self.session.get_inputs()[0].shape[1:]

    @bentoml.api  # the type it always had: [N, H, W], one-channel images as the load test sends them
    def predict(self, images: list[list[list[float]]]) -> dict:
        x = np.asarray(images, dtype=np.float32).reshape(len(images), *self.shape)
        logits = self.session.run(None, {self.input_name: x})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return {
            "predictions": [
                {"label": self.labels[int(p.argmax())], "class_id": int(p.argmax()), "probabilities": p.tolist()}
                for p in probs
            ]
        }
