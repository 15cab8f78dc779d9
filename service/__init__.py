"""Fashion-MNIST prediction service: BentoML + onnxruntime (README.md, "Serving")."""
