"""Import the exported model into the BentoML model store (what `make bento` does first).

    python -m service.store artifacts/model.onnx     # prints the tag, e.g. fashion-mnist:3f2a...

The tag is the model's contract name and its sha256 prefix, so importing the same file twice is a
no-op and a new export gets a new version. The checksum and contract are verified first. An INT8 form
exported beside it (model_int8.onnx, its .sha256 and fingerprint: docs/int8.md) is stored with it, so
the bento can serve what PRECISION asks for; the service checks those files at start as it does beside
MODEL_PATH, and their bytes are part of the version.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def import_model(model_path: Path) -> str:
    import bentoml

    from .contract import ModelLoadError, load_contract

    try:
        info, data = load_contract(model_path)  # checks sha256 and the contract
    except ModelLoadError as exc:
        print(f"cannot import: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    companions = sorted(model_path.parent.glob(f"{model_path.stem}_int8*"))  # the INT8 form, if exported
    version = info.sha256
    if companions:
        digest = hashlib.sha256(info.sha256.encode())
        for path in companions:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        version = digest.hexdigest()
    tag = f"{info.name}:{version[:20]}"
    try:
        bentoml.models.get(tag)
        return tag  # same bytes already stored
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(
        tag,
        labels={"arch": info.metadata.get("arch", ""), "folded": info.metadata.get("folded", "")},
        metadata={"sha256": info.sha256, "test_accuracy": info.metadata.get("test_accuracy"), "labels": list(info.labels)},
    ) as stored:
        # The store copy keeps the export's file names, so the service checks it the same way;
        # it is the bytes that were verified, not a second read of the file.
        Path(stored.path, "model.onnx").write_bytes(data)
        Path(stored.path, "model.onnx.sha256").write_text(f"{info.sha256}  model.onnx\n", encoding="utf-8")
        for path in companions:  # named as the service looks for them beside model.onnx
            Path(stored.path, path.name.replace(model_path.stem, "model", 1)).write_bytes(path.read_bytes())
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.store", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", default=Path("artifacts/model.onnx"),
                        help="the exported model.onnx (its .sha256 beside it)")
    args = parser.parse_args(argv)
    print(import_model(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
