"""Fashion-MNIST prediction service: BentoML + onnxruntime (docs/service.md)."""
