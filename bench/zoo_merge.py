"""bench-zoo's merge part (docs/zoo.md, "Merged train-time branches"): for the re-parameterizable
models (RepVGG, MobileOne, FastViT, RepViT), what our export made of their branches beside what
timm's own `reparameterize_model` makes of them, in the same run:

- Conv nodes: ours (model.onnx) vs timm's re-parameterized model exported the way ours is (torch.onnx
  with optimize=False, then our clean-up: so only the merge differs, not the exporter's other fusions
  such as GELU) vs the model as exported (torch.onnx's defaults: dynamo, optimize=True, which folds
  Conv+BN but keeps every branch);
- exactness against the branch model in float64 (torch .double()): ours is the export's own proof
  (`fx merge` in export_report.json: the merged float64 model against the unfolded one), timm's is its
  float32 merge (what `reparameterize_model` computes on a float32 model) run in float64, and the same
  merge made on the float64 model;
- onnxruntime img/s, 1 thread, batch 1, ORT_ENABLE_ALL (its own Conv+BN fusion on): ours, as exported,
  timm's, and our unfolded reference (model_unfolded.onnx: optimize=False, bias-free convs' zero biases
  still computed at run time), interleaved rounds, medians.
"""
import copy
import json
import time
from pathlib import Path

import numpy as np

MERGE_VERSION = 3  # bump when what this part measures changes (its cache key)
ROUNDS, ROUND_S = 7, 0.6


def conv_nodes(model) -> int:
    return sum(n.op_type == "Conv" for g in (model.graph, *model.functions) for n in g.node)


def session(model):
    """An onnxruntime session of a file or a ModelProto: ORT_ENABLE_ALL, one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def img_per_s(sessions: dict, x: np.ndarray) -> dict:
    """Images per second at batch 1 for each session: ROUNDS interleaved rounds of ROUND_S seconds each
    (one warm-up call first), the median round."""
    rates = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            feed, n, started = {s.get_inputs()[0].name: x}, 0, time.perf_counter()
            while time.perf_counter() - started < ROUND_S:
                s.run(None, feed)
                n += 1
            rates[name].append(n / (time.perf_counter() - started))
    return {name: round(float(np.median(r)), 1) for name, r in rates.items()}


def run_merge(model, export_dir: Path, x: np.ndarray, ref64: np.ndarray) -> dict:
    """`model`: the float32 branch model (eval); `export_dir`: our export of it; `x`: the check rows;
    `ref64`: the branch model in float64 on them."""
    import onnx
    import torch
    from timm.utils.model import reparameterize_model

    from export.onnx_export import export_to_proto, simplify

    report = json.loads((export_dir / "export_report.json").read_text())
    ours = onnx.load(export_dir / "model.onnx")
    fx_merge = report["parity"]["exactness"].get("fx merge", {})
    scale = float(np.abs(ref64).max())
    result = {"bn_left": report.get("bn_dropout_left_in_folded", {}).get("BatchNormalization", 0),
              "merged_blocks": len(report["fold"].get("merged", [])),
              "merge_refused": [f"{e['block']}: {e['reason']}" for e in report["fold"].get("merge_refused", [])],
              "conv": {"ours": conv_nodes(ours)},
              "diff": {"ours": {"max_abs": fx_merge.get("max_abs_diff"), "relative": fx_merge.get("relative"),
                                "how": "the export's fx merge proof, float64"}}}
    with torch.no_grad():
        timm32 = reparameterize_model(model)  # a copy; computed in float32, as a user gets it
        for name, merged in (("timm (float32 merge)", copy.deepcopy(timm32).double()),
                             # (.double() again: RepViT's fuse() builds its new convs in float32)
                             ("timm (float64 merge)", reparameterize_model(copy.deepcopy(model).double()).double())):
            diff = float(np.abs(merged(torch.from_numpy(x).double()).numpy() - ref64).max())
            result["diff"][name] = {"max_abs": diff, "relative": diff / scale}
    timm_graph = simplify(export_to_proto(timm32, (2, *x.shape[1:]), "input", ["logits"]))
    with torch.no_grad():  # the branch model as a user exports it: torch.onnx's defaults
        program = torch.onnx.export(model, (torch.from_numpy(x[:1]),), dynamo=True, optimize=True, verbose=False)
    as_exported = onnx.ModelProto.FromString(program.model_proto.SerializeToString())
    result["conv"]["as exported"] = conv_nodes(as_exported)
    result["conv"]["timm"] = conv_nodes(timm_graph)
    result["bn_left_timm"] = sum(n.op_type == "BatchNormalization" for n in timm_graph.graph.node)
    rates = img_per_s({"ours": session(export_dir / "model.onnx"), "as exported": session(as_exported),
                       "timm": session(timm_graph), "unfolded reference": session(export_dir / "model_unfolded.onnx")},
                      x[:1])
    result["img_s"] = rates
    result["speedup"] = round(rates["ours"] / rates["as exported"], 2)
    return result


def table(results: list[dict]) -> list[str]:
    """The docs/zoo.md section: one row per model that has a merge part."""
    rows = [r for r in results if r.get("merge")]
    if not rows:
        return []
    lines = ["## Merged train-time branches (ours vs timm's `reparameterize_model`)", "",
             "BNs left in model.onnx; Conv nodes in ours / timm's re-parameterized model (exported as ours is: torch.onnx "
             "with optimize=False and our clean-up) / the model as exported (every branch); max |diff| against the "
             "branch model in float64 (relative to "
             "max |logit|): ours (the export's own float64 proof of its merges), timm's merge as computed on the "
             "float32 model, and timm's merge computed on the float64 model; onnxruntime img/s, 1 thread, batch 1, "
             "ORT_ENABLE_ALL, medians of interleaved rounds in one run: ours, the branch model as exported with torch.onnx's "
             "defaults (dynamo, optimize=True: Conv+BN folded, every branch kept), timm's; and ours / as exported.", "",
             "| model | BNs left | Conv: ours · timm · as exported | |diff| ours (f64 merge) | timm f32 merge | timm f64 merge "
             "| img/s ours · as exported · timm | ours / as exported |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["merge"]
        if "error" in m:
            lines.append(f"| {r['name']} | error: {m['error']} |  |  |  |  |  |  |")
            continue
        c, d, s = m["conv"], m["diff"], m["img_s"]

        def cell(k):
            return f"{d[k]['max_abs']:.1e} ({d[k]['relative']:.0e})" if d.get(k, {}).get("max_abs") is not None else "–"
        lines.append(f"| {r['name']} | {m['bn_left']} | {c['ours']} · {c['timm']} · {c['as exported']} | {cell('ours')} "
                     f"| {cell('timm (float32 merge)')} | {cell('timm (float64 merge)')} "
                     f"| {s['ours']:.0f} · {s['as exported']:.0f} · {s['timm']:.0f} | **{m['speedup']:.2f}x** |")
    refused = [f"- **{r['name']}**: {why}" for r in rows for why in r["merge"].get("merge_refused", [])]
    return lines + ([""] + ["Refused merges:"] + refused if refused else []) + [""]
