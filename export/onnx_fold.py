"""BatchNorm folding inside ONNX graphs (issue 9): INTERFACE ONLY, the pass is being written on
branch onnx-fold and replaces this file before anything lands.

    fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]

returns a new model (the input is not modified) and a report with the same keys as the PyTorch
pass's FoldReport.as_dict(): {"folded": [{"bn", "into", "direction"}], "kept": [{"bn", "reason"}],
"removed": [{"node", "op", "why"}], ...}.
"""
import onnx


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    return folded, {"folded": [], "kept": [], "removed": [], "notes": ["ONNX graph pass not written yet"]}
