"""python -m bench.zoo --out artifacts/bench_zoo [--only a,b] [--timeout S] [--rows N] [--force] [--lock F] [--report]

Torchvision/timm architectures (bench/zoo_models.py) through `python -m export --model`, and beside it
what torch.fx `fuse`, torch.onnx.export(dynamo=True, optimize=True), onnxsim, onnxslim and onnxoptimizer
leave. Per model, in its own process (`--one NAME`): random init with calibrated BN statistics saved
as safetensors (`prepare`), our CLI in a subprocess (`run_ours`), the peers (`run_peers`), and every
published form checked against the model in float64 (`check`), and for the re-parameterizable ones
our merge beside timm's `reparameterize_model` (bench/zoo_merge.py). Cached per model in
OUT/models/NAME.json (`keys`). Method and numbers: docs/zoo.md.
"""
import argparse
import copy
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = Path(__file__).with_name("zoo_models.py")
SIZE, SEED, CALIBRATION = 224, 0, (4, 8)  # input side; seed; calibration batches x batch size
SIZES = {"inception_v3": 299}  # its aux head (run in train mode) needs 299x299
CHECK_ROWS, ATOL, RTOL, FACTOR = 8, 1e-5, 1e-5, 2.0
CHAOTIC = 1e-3  # float32's own error vs float64, relative to max |logit|, above which a net is "chaotic"
PEERS = ("fx fuse", "dynamo optimize", "onnxsim", "onnxslim", "onnxoptimizer")
PEERS_VERSION = 3  # bump when run_peers or check changes what they measure (the peers' cache key)


def digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode() + Path(path).read_bytes())
    return h.hexdigest()[:16]


def keys(name: str, rows: int | None) -> dict:
    """What each part's result depends on: the model's entry, the set-up, and our code (and --rows) or the peers' version."""
    from bench.zoo_models import MODELS

    setting = hashlib.sha256(repr((MODELS[name], SIZES.get(name, SIZE), SEED, CALIBRATION, CHECK_ROWS)).encode()).hexdigest()[:8]
    code = digest([*ROOT.glob("export/*.py"), *ROOT.glob("common/*.py")])
    from bench.zoo_merge import MERGE_VERSION

    ours = f"{setting}-{code}" + (f"-rows{rows}" if rows else "")
    return {"ours": ours, "peers": f"{setting}-v{PEERS_VERSION}", "merge": f"{ours}-m{MERGE_VERSION}"}


def one_line(e: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return (f"{type(e).__name__}: " if isinstance(e, BaseException) else "") + text[:limit]


# --- one model ---------------------------------------------------------------------------------

def prepare(name: str, weights: Path, key: str):
    """The model with calibrated BN statistics (eval mode), saved to `weights` (reused when its
    stamp says it was made with this set-up: `key`)."""
    import torch
    from safetensors.torch import load_file, save_file

    from bench.zoo_models import build

    torch.manual_seed(SEED)
    model = build(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    stamp = weights.with_suffix(".key")
    if weights.exists() and stamp.exists() and stamp.read_text() == key:
        state = load_file(str(weights))
        with torch.no_grad():  # in place: load_state_dict would need the state dict's _metadata (MNASNet)
            for k, v in model.state_dict().items():
                v.copy_(state[k])
        return model.eval(), len(bns)
    g, momenta = torch.Generator().manual_seed(SEED), [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            if bn.affine:  # non-trivial gamma/beta, so a fold that ignores them shows
                bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=g))
                bn.bias.copy_(torch.empty_like(bn.bias).uniform_(-0.2, 0.2, generator=g))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative mean over the calibration batches
        model.train()
        batches, batch = CALIBRATION
        for _ in range(batches):
            model(torch.rand(batch, 3, SIZES.get(name, SIZE), SIZES.get(name, SIZE), generator=g))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(weights))
    stamp.write_text(key)
    return model, len(bns)


def check(outputs: np.ndarray, ref64: np.ndarray, own: dict | None = None) -> dict:
    """outputs vs the model in float64: within 1e-5 + 1e-5|ref|, or (given float32's `own` error)
    no more than FACTOR x that error with argmax agreement no worse."""
    diff = np.abs(outputs.astype(np.float64) - ref64)
    result = {"max_abs": float(diff.max()), "within_tol": bool(np.all(diff <= ATOL + RTOL * np.abs(ref64))),
              "argmax": float((outputs.argmax(1) == ref64.argmax(1)).mean())}
    if own is not None:
        result["ratio"] = result["max_abs"] / max(own["max_abs"], 1e-300)
        result["matches"] = result["within_tol"] or (result["ratio"] <= FACTOR and result["argmax"] >= own["argmax"])
    return result


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as the tool left it
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def constant_folded(model):
    """The unfolded export with onnxscript's constant folding only (no rewrite rules, no BN fusion):
    torch.onnx (optimize=False) computes bias-free convs' zero biases at run time (Shape -> Expand ->
    CastLike), which keeps every graph tool from fusing BN into them."""
    import onnxscript.ir.passes.common as passes
    from onnxscript import ir, optimizer

    graph = ir.serde.deserialize_model(model)
    optimizer.fold_constants(graph)
    passes.RemoveUnusedNodesPass()(graph)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    return ir.serde.serialize_model(graph)


def bn_nodes(model) -> int:
    return sum(n.op_type == "BatchNormalization" for g in (model.graph, *model.functions) for n in g.node)


def run_ours(name: str, weights: Path, out: Path, timeout: float, rows: int | None, x, ref64, own) -> dict:
    """The export CLI as a user runs it; with `rows`, on that many seeded uniform [0, 1) rows (--sample)
    instead of its default verification inputs."""
    import onnx

    side = SIZES.get(name, SIZE)
    cmd = [sys.executable, "-m", "export", "--model", f"{FACTORIES}:{name}", "--weights", str(weights),
           "--input-shape", f"3,{side},{side}", "--out", str(out)]
    if rows:
        sample = out.parent / f"sample{rows}.npy"
        np.save(sample, np.random.default_rng(SEED).uniform(0, 1, (rows, 3, side, side)).astype(np.float32))
        cmd += ["--sample", str(sample)]
    (out / "export_report.json").unlink(missing_ok=True)
    (out / "model.onnx").unlink(missing_ok=True)
    started = time.perf_counter()
    with open(out.parent / "export.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True, timeout=timeout)
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            code, stderr = None, f"timed out after {timeout:.0f} s"
        log.write(stderr)
    result = {"command": " ".join(cmd[1:]), "exit": code, "seconds": round(time.perf_counter() - started, 1),
              "stderr": one_line(stderr.strip().splitlines()[-1] if stderr.strip() else "", 600)}
    try:
        report = json.loads((out / "export_report.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return result
    fold, parity = report.get("fold", {}), report.get("parity", {})
    folded = fold.get("folded", [])
    kinds = [(e.get("pass"), e.get("kind", "batchnorm")) for e in folded]
    reasons, kept = {}, [e for e in fold.get("kept", []) if e.get("kind", "batchnorm") == "batchnorm"]
    for entry in kept:
        reasons[entry.get("reason", "?")] = reasons.get(entry.get("reason", "?"), 0) + 1
    f64, variants = parity.get("float64", {}), parity.get("variants", {})
    old_own = f64.get("variants", {}).get(parity.get("reference"), {})  # before parity.own (main 9a4d1a4)
    result.update(
        folded_fx=kinds.count(("fx", "batchnorm")), folded_onnx=kinds.count(("onnx", "batchnorm")),
        folded_affine=sum(k == "affine" for _, k in kinds), kept=len(kept), kept_reasons=reasons,
        kept_affine=len(fold.get("kept", [])) - len(kept),
        untraceable=[f"{u.get('module')}: {u.get('reason')}" for u in fold.get("untraceable", [])],
        bn_left=report.get("bn_dropout_left_in_folded", {}).get("BatchNormalization", 0),
        summary=report.get("summary"), rows=parity.get("images"), passed=parity.get("passed"), failed_step=parity.get("failed_step"),
        timings=report.get("timings"), exactness=parity.get("exactness"), float64=f64.get("available"),
        diagnosis=parity.get("why") or f64.get("diagnosis") or f64.get("why"),
        clauses={n: r.get("clause") for n, r in variants.items() if "clause" in r},
        failing=[n for n, r in variants.items() if r.get("passed") is False or (  # new report, then old
            "passed" not in r and "within_tolerance" in r and not (r["within_tolerance"] and r.get("argmax_agreement") == 1.0))],
        f32_err_report=variants.get(parity.get("own"), old_own).get("max_abs_diff"),
        worst_ratio=max([r["ratio"] for r in variants.values() if r.get("ratio") is not None], default=None))
    result["published"] = code == 0 and (out / "model.onnx").exists()
    if result["published"]:
        result["check"] = check(run_onnx(onnx.load(out / "model.onnx"), x), ref64, own)
    return result


def run_peers(model, n_bn: int, x, ref64, own, work: Path) -> dict:
    import onnx
    import torch
    from torch.fx.experimental.optimization import fuse

    tools = {}

    def timed(tool, fn):
        started = time.perf_counter()
        try:
            value = fn()
            tools[tool] = {"seconds": round(time.perf_counter() - started, 1)}
            return value
        except Exception as e:
            tools[tool] = {"seconds": round(time.perf_counter() - started, 1), "error": one_line(e)}
            return None

    fused = timed("fx fuse", lambda: fuse(model))
    if fused is not None:
        modules = dict(fused.named_modules())  # BN modules still called, and functional batch_norm (BN subclasses
        left = sum((n.op == "call_module" and isinstance(modules[n.target], torch.nn.modules.batchnorm._BatchNorm))
                   or (n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", ""))
                   for n in fused.graph.nodes)  # such as timm's BatchNormAct2d are traced into)
        with torch.no_grad():
            tools["fx fuse"].update(left=left, check=check(fused(torch.from_numpy(x)).numpy(), ref64, own))

    def dynamo():  # one export; optimize() afterwards is what optimize=True runs, timed together
        program = torch.onnx.export(model, (torch.from_numpy(x),), dynamo=True, optimize=False, verbose=False)
        unfolded = onnx.ModelProto.FromString(program.model_proto.SerializeToString())
        program.optimize()
        return unfolded, program.model_proto
    exported = timed("dynamo optimize", dynamo)
    graphs = {}
    if exported is not None:
        raw, graphs["dynamo optimize"] = exported
        unfolded = constant_folded(raw)
        onnx.save(unfolded, work / "unfolded.onnx")
        tools["unfolded"] = {"bn_nodes": bn_nodes(unfolded)}
        import onnxoptimizer
        import onnxsim
        import onnxslim

        graph_tools = {"onnxsim": lambda g: onnxsim.simplify(g)[0], "onnxslim": onnxslim.slim,
                       "onnxoptimizer": lambda g: onnxoptimizer.optimize(g, onnxoptimizer.get_fuse_and_elimination_passes())}
        for tool, run in graph_tools.items():
            graphs[tool] = timed(tool, lambda: run(unfolded))
            try:  # the same tool on the export as torch.onnx wrote it (zero conv biases computed at run time)
                left_raw = bn_nodes(run(raw))
            except Exception as e:
                left_raw = one_line(e, 120)
            tools[tool]["left_on_raw_export"] = left_raw
    for tool, graph in graphs.items():
        if graph is not None:
            tools[tool]["left"] = bn_nodes(graph)
            try:
                tools[tool]["check"] = check(run_onnx(graph, x), ref64, own)
            except Exception as e:
                tools[tool]["check"] = {"error": one_line(e)}
    return tools


def one(name: str, out: Path, parts: list[str], timeout: float, rows: int | None) -> dict:
    import torch

    work = out / "models" / name
    (work / "export").mkdir(parents=True, exist_ok=True)
    path = out / "models" / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    started = time.perf_counter()
    k = keys(name, rows)
    model, n_bn = prepare(name, work / "weights.safetensors", k["peers"].split("-")[0])
    side = SIZES.get(name, SIZE)
    x = torch.rand(CHECK_ROWS, 3, side, side, generator=torch.Generator().manual_seed(SEED + 1)).numpy()
    with torch.no_grad():
        y32 = model(torch.from_numpy(x)).numpy()
        try:
            ref64 = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
        except Exception as e:
            raise SystemExit(f"{name} cannot run in float64: {one_line(e)}")
    own = check(y32, ref64)
    from bench.zoo_models import MODELS

    result.update(name=name, library=MODELS[name][0], note=MODELS[name][2], bns=n_bn,
                  params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                  prepare_seconds=round(time.perf_counter() - started, 1),
                  f32=dict(own, rel=own["max_abs"] / float(np.abs(ref64).max()),
                           chaotic=own["max_abs"] / float(np.abs(ref64).max()) > CHAOTIC))
    if "ours" in parts:
        result["ours"] = dict(run_ours(name, work / "weights.safetensors", work / "export", timeout, rows, x, ref64, own),
                              key=k["ours"])
    if "peers" in parts:
        result["peers"] = dict(run_peers(model, n_bn, x, ref64, own, work), key=k["peers"])
    if "merge" in parts:
        from bench.zoo_merge import run_merge

        try:
            merge = run_merge(model, work / "export", x, ref64) if result.get("ours", {}).get("published") else {
                "error": "our export was not published"}
        except Exception as e:  # noqa: BLE001 -- recorded, shown in the table
            merge = {"error": one_line(e)}
        result["merge"] = dict(merge, key=k["merge"])
    result["versions"] = {"torch": torch.__version__}
    path.write_text(json.dumps(result, indent=1))
    return result


# --- the whole zoo -----------------------------------------------------------------------------

def run_zoo(names: list[str], out: Path, timeout: float, rows: int | None, force: bool, lock: str | None) -> list[dict]:
    from tqdm import tqdm

    results = []
    for name in (bar := tqdm(names, unit="model")):
        k = keys(name, rows)
        path = out / "models" / f"{name}.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        from bench.zoo_models import REPARAM

        parts = [p for p in ("ours", "peers", "merge") if (p != "merge" or name in REPARAM)
                 and (force or cached.get(p, {}).get("key") != k[p])]
        bar.set_description(f"{name} ({'+'.join(parts) or 'cached'})")
        if parts:
            with open(lock or os.devnull, "a") as held:
                waited = time.perf_counter()
                if lock:
                    fcntl.flock(held, fcntl.LOCK_EX)
                load_before, waited = os.getloadavg(), time.perf_counter() - waited
                cmd = [sys.executable, "-m", "bench.zoo", "--one", name, "--out", str(out), "--parts", ",".join(parts),
                       "--timeout", str(timeout)] + (["--rows", str(rows)] if rows else [])
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2 * timeout + 300)
                    error = None if proc.returncode == 0 else one_line(proc.stderr.strip().splitlines()[-1:] or "?")
                except subprocess.TimeoutExpired:
                    error = f"the benchmark of {name} timed out after {2 * timeout + 300:.0f} s"
            cached = json.loads(path.read_text()) if path.exists() else {"name": name}
            cached.update(error=error, load_before=[round(v, 2) for v in load_before], load_after=[
                round(v, 2) for v in os.getloadavg()], lock_wait_s=round(waited, 1), date=time.strftime("%Y-%m-%d %H:%M"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        results.append(cached)
    return results


def main(argv=None) -> int:
    from bench.zoo_models import MODELS

    p = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", type=Path, default=Path("artifacts/bench_zoo"))
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(MODELS)}")
    p.add_argument("--timeout", type=float, default=900, help="seconds per export (default: 900)")
    p.add_argument("--rows", type=int, help="verify on this many seeded random rows (--sample) instead of the CLI's default")
    p.add_argument("--force", action="store_true", help="redo every model, cached or not")
    p.add_argument("--lock", help="flock this file around each model (the timing columns), e.g. /tmp/bnfold-cpu.lock")
    p.add_argument("--report", action="store_true", help="only write the summary from the cached records")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--parts", default="ours,peers,merge", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"bench.zoo: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.one:
        try:
            one(args.one, args.out, args.parts.split(","), args.timeout, args.rows)
        except Exception as e:
            traceback.print_exc()
            print(f"bench.zoo: {args.one}: {one_line(e)}", file=sys.stderr)
            return 1
        return 0
    from bench.zoo_report import write_report

    if args.report:
        records = [args.out / "models" / f"{name}.json" for name in names]
        results = [json.loads(path.read_text()) for path in records if path.exists()]
    else:
        results = run_zoo(names, args.out, args.timeout, args.rows, args.force, args.lock)
    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
