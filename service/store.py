"""Import the exported model into the BentoML model store (what `make bento` does first).

    python -m service.store artifacts/model.onnx     # prints the tag, e.g. fashion-mnist:3f2a...

The version is the model's sha256 prefix, so importing the same file twice is a no-op and a
new export gets a new version. The checksum and metadata are verified before anything is stored.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MODEL_NAME = "fashion-mnist"


def import_model(model_path: Path) -> str:
    import bentoml

    from .model import ModelLoadError, OnnxClassifier

    try:
        classifier = OnnxClassifier(model_path, provider="cpu")  # checks sha256 and the contract
    except ModelLoadError as exc:
        raise SystemExit(f"cannot import: {exc}") from None
    info = classifier.info
    tag = f"{MODEL_NAME}:{info.sha256[:20]}"
    try:
        bentoml.models.get(tag)
        return tag  # same bytes already stored
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(
        tag,
        labels={"arch": info.arch, "folded": info.metadata.get("folded", "")},
        metadata={"sha256": info.sha256, "test_accuracy": info.test_accuracy, "labels": list(info.labels)},
    ) as stored:
        # The store copy keeps the export's file names, so the service checks it the same way.
        shutil.copyfile(model_path, Path(stored.path) / "model.onnx")
        Path(stored.path, "model.onnx.sha256").write_text(f"{info.sha256}  model.onnx\n", encoding="utf-8")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("artifacts/model.onnx"))
    args = parser.parse_args(argv)
    print(import_model(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
