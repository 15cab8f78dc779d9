"""python -m bench.unseen --out artifacts/bench_unseen [--only a,b]   (make bench-unseen)

The independent check of docs/zoo.md: architectures `make bench-zoo` never runs, with weights made
another way, each through `python -m export --model` exactly as a user runs it. The weights: BN
statistics from 3 forward passes in train mode on N(0.5, 0.3) inputs, then every BN's scale drawn
from U(0.3, 2.0), its shift from N(0, 0.2) and its running variance multiplied by U(0.5, 2) per
channel (seed 7): far from a trained net, and ill-conditioned on purpose (float32 hundreds of times
the 1e-5 tolerance off float64 on some). Per model: exit code, seconds, BNs folded / kept, float32
runs drawn, and the worst ratio to float32's own error. Writes OUT/results.json and OUT/results.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

TORCHVISION = ["resnet18", "regnet_y_400mf", "efficientnet_v2_s", "mobilenet_v3_small", "mnasnet0_5",
               "shufflenet_v2_x0_5"]
TIMM = ["tf_efficientnet_b0", "dpn68", "ese_vovnet19b_dw", "levit_128s", "mobileone_s0", "res2net50_26w_4s",
        "skresnet18", "gernet_s", "xception41", "fbnetc_100", "semnasnet_100", "cs3darknet_s", "resnet26d",
        "seresnext26d_32x4d", "nf_resnet26", "fastvit_t8", "efficientformer_l1", "tinynet_a", "hardcorenas_a"]
ULTRALYTICS = ["yolov8n"]  # DetectionModel from its yaml: a tuple of a tensor and a dict of lists out
SIZES = {"yolov8n": 320}


def build(name: str) -> torch.nn.Module:
    if name in TORCHVISION:
        import torchvision.models
        return getattr(torchvision.models, name)(weights=None)
    if name in ULTRALYTICS:
        from ultralytics.nn.tasks import DetectionModel
        return DetectionModel(f"{name}.yaml", nc=80, verbose=False)
    import timm
    return timm.create_model(name, pretrained=False)


for _name in TORCHVISION + TIMM + ULTRALYTICS:  # factories for --model bench/unseen.py:NAME
    globals()[_name] = (lambda n: lambda: build(n))(_name)


def weights(name: str, path: Path) -> None:
    from safetensors.torch import save_file
    torch.manual_seed(7)
    model, size = build(name), SIZES.get(name, 224)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(0.5 + 0.3 * torch.randn(4, 3, size, size))
        for bn in bns:
            if bn.affine:
                bn.weight.uniform_(0.3, 2.0)
                bn.bias.normal_(0, 0.2)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))


def one(name: str, out: Path) -> dict:
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    weights(name, work / "weights.safetensors")
    size, t0 = SIZES.get(name, 224), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "export", "--model", f"{__file__}:{name}", "--weights",
                           str(work / "weights.safetensors"), "--input-shape", f"3,{size},{size}", "--out",
                           str(work / "export")], capture_output=True, text=True)
    (work / "export.log").write_text(done.stdout + done.stderr)
    row = {"model": name, "exit": done.returncode, "seconds": round(time.monotonic() - t0, 1)}
    report = work / "export" / "export_report.json"
    if done.returncode in (2, 3) or not report.exists():  # bad input, or an internal error (no report)
        return {**row, "why": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(report.read_text())
    parity, fold = r["parity"], r.get("fold", {})
    judged = [v for n, v in parity["variants"].items() if n != parity["own"] and "ratio" in v]
    return {**row, "folded": sum(e.get("kind") == "batchnorm" for e in fold.get("folded", [])),
            "kept": sum(e.get("kind") == "batchnorm" for e in fold.get("kept", [])),
            "own_tol_error": parity["variants"].get(parity["own"], {}).get("tol_error"),
            "runs": len(parity.get("float32_runs", {}).get("tol_errors", [])) or 1,
            "worst_ratio": max((v["ratio"] for v in judged), default=None),
            **({"why": parity.get("why", "")[:300]} if not parity["passed"] else {})}


def table(rows: list[dict]) -> str:
    lines = ["| model | result | s | BNs folded / kept | float32 own err/tol | float32 runs | worst ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "**published**" if r["exit"] == 0 else f"exit {r['exit']}: {r.get('why', '')}"
        own = f"{r['own_tol_error']:.3g}" if r.get("own_tol_error") is not None else ""
        ratio = f"{r['worst_ratio']:.2f}" if r.get("worst_ratio") is not None else ""
        lines.append(f"| {r['model']} | {result} | {r['seconds']:.0f} | {r.get('folded', '')} / {r.get('kept', '')} "
                     f"| {own} | {r.get('runs', '')} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench_unseen"))
    ap.add_argument("--only", default=None, help="comma list of models (default: all)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else TORCHVISION + TIMM + ULTRALYTICS
    if unknown := sorted(set(names) - set(TORCHVISION + TIMM + ULTRALYTICS)):
        ap.error(f"unknown model(s) {unknown}")
    rows = []
    from tqdm import tqdm
    for name in (bar := tqdm(names, unit="model")):
        bar.set_postfix_str(name)
        rows.append(one(name, args.out))
        tqdm.write(f"{name}: exit {rows[-1]['exit']}, {rows[-1]['seconds']} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
             "command": " ".join(["python -m bench.unseen", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps({**stamp, "models": rows}, indent=1))
    (args.out / "results.md").write_text(f"`{stamp['command']}`, {stamp['date']}, torch {stamp['torch']}: "
                                         f"{sum(r['exit'] == 0 for r in rows)} of {len(rows)} published\n\n{table(rows)}\n")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
