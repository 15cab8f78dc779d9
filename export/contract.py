"""The vocabulary of docs/onnx-contract.md that the exporter writes (no heavy imports: the CLI's
--help and argument checks use it before torch is loaded)."""

CONTRACT_VERSION = 3
LAYOUTS = ("NCHW", "NHWC", "NCW", "NC", "other")
LAYOUT_RANK = {"NCHW": 4, "NHWC": 4, "NCW": 3, "NC": 2}
IMAGE_LAYOUTS = ("NCHW", "NHWC")
DEFAULT_RANGE = [0.0, 1.0]
MIN_OPSET = 13
