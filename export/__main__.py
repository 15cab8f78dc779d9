"""python -m export: fold BatchNorm, strip Dropout, export a verified eval-mode ONNX.

Fold BN, strip Dropout, export model.onnx (folded) and model_unfolded.onnx (the reference), check
parity, write export_report.json. Nothing is published unless parity passes; exit 1 when it
fails, 2 on bad input (one line on stderr, nothing written), 3 on an internal error (a bug of
ours, not your input: one line naming the traceback's file, nothing published). docs/export.md has the guide."""
import argparse
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

import onnx

from export.contract import LAYOUTS
from export.errors import BadInput, one_line
from training.data import DEFAULT_DATA_DIR, DataError

DEFAULT_RUN = "artifacts/runs/seed-cnn"
EPILOG = """examples:
  python -m export --run artifacts/runs/seed-cnn --out artifacts
  python -m export --model my_model.py:build --weights my_model.safetensors --input-shape 3,32,32 \\
      --labels labels.txt --out exports/my_model
  python -m export --onnx keras_model.onnx --labels labels.json --out exports/keras_model

labels files: .txt with one label per line (no blank lines), or .json holding a list of strings;
their count must equal the model's number of outputs K. Without --labels: class_0 ... class_{K-1}.

exit status: 0 published (or verified); 1 a check failed (nothing published, the failing step named);
2 bad input (one line, nothing written); 3 internal error, a bug of ours (one line naming the traceback's file)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise BadInput(f"{message} (see python -m export --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m export", description=__doc__.split("\n\n")[1], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    what = p.add_argument_group("what to export (one of; default: --run artifacts/runs/seed-cnn)")
    source = what.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="DIR", help=f"a training run of ours (weights.safetensors + config.json) "
                        f"(default: {DEFAULT_RUN} when neither --model nor --onnx is given)")
    source.add_argument("--model", metavar="FILE.py:FACTORY", help="any PyTorch model: FACTORY is a zero-argument "
                        "callable returning an nn.Module, in FILE.py or as package.module:FACTORY (default: none)")
    source.add_argument("--onnx", metavar="FILE.onnx", help="any ONNX graph with one float32 input (default: none)")
    p.add_argument("--out", default="artifacts", metavar="DIR",
                   help="where model.onnx, model_unfolded.onnx, their .sha256 and export_report.json go (default: artifacts)")
    model = p.add_argument_group("--model only")
    model.add_argument("--weights", metavar="W", help="the weights: .safetensors, or a .pt/.pth state_dict read with "
                       "torch.load(weights_only=True) (required with --model)")
    model.add_argument("--input-shape", metavar="C,H,W|F", help="the model's input without the batch axis, in its own "
                       "axis order: C,H,W (NCHW), H,W,C (NHWC), C,W (NCW) or F (flat features) (required with --model)")
    byo = p.add_argument_group("--model and --onnx")
    byo.add_argument("--layout", choices=LAYOUTS, help="input layout (default: inferred from the input shape: rank 4 "
                     "whose last axis is 1, 3 or 4 and second is not -> NHWC, other rank 4 -> NCHW, rank 3 -> NCW, "
                     "rank 2 -> NC, else other)")
    byo.add_argument("--input-range", metavar="LO,HI", help="the values the model takes; random verification "
                     "inputs are drawn from it and the service refuses values outside it (default: 0,1)")
    byo.add_argument("--labels", metavar="FILE", help="class names, .txt (one per line) or .json (a list) "
                     "(default: class_0 ... class_{K-1})")
    byo.add_argument("--sample", metavar="X.npy", help="a batch [N, *input shape] to verify on (read with "
                     "allow_pickle=False) (default: seeded random rows from --input-range; see --samples)")
    byo.add_argument("--samples", metavar="N", help="verify on N rows: N seeded random rows, or the first N of --sample "
                     "(default: all of --sample; else as many random rows as the model's cost allows, 16 to 256: 256 for "
                     "small nets, 16 for ImageNet-sized ones; docs/export.md)")
    byo.add_argument("--class-output", metavar="NAME", help="a model with several outputs: the one that holds [N, K] class "
                     "scores, so it is served as a classifier (default: a model with one [N, K] output is a "
                     "classifier, any other is not)")
    byo.add_argument("--name", help="the model's name in the service (/v2/models/<name>) (default: the file's stem)")
    byo.add_argument("--background", choices=("dark", "light"), help="image models: dark = light object on a dark "
                     "background, as in Fashion-MNIST (default: not recorded)")
    run = p.add_argument_group("--run only")
    run.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"Fashion-MNIST IDX files (default: {DEFAULT_DATA_DIR})")
    q = p.add_argument_group("INT8 (docs/int8.md): quantize the folded graph, verify it on this host, publish "
                             "model_int8.onnx beside model.onnx only when it passes")
    q.add_argument("--int8", action="store_true", help="static post-training quantization (QDQ, per-channel symmetric "
                   "weights) after the float32 forms passed (default: off)")
    q.add_argument("--calib", metavar="X.npy|random", help="calibration inputs [N, *input shape] (read with "
                   "allow_pickle=False, in the input range), or `random` (seeded uniform rows; the report says so) "
                   "(default: 1,024 training images for --run; required with --model and --onnx)")
    q.add_argument("--max-drop", metavar="PP", help="largest accuracy drop against the float64 model, in percentage "
                   "points, 0-100; without labels the top-1 disagreement with float64 (default: 0.5)")
    q.add_argument("--no-equalize", action="store_true", help="no cross-layer equalization (default: on)")
    q.add_argument("--no-absorb", action="store_true", help="no high-bias absorption (default: on)")
    q.add_argument("--no-bias-correction", action="store_true", help="no analytic bias correction (default: on)")
    q.add_argument("--int8-types", metavar="T", help="U8S8, U8S8R (7-bit weights), S8S8 or U8U8 (default: auto: U8S8 "
                   "on VNNI hosts, U8S8R on x86 without VNNI, where 8-bit weights saturate; S8S8 on ARM)")
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    p.add_argument("--verify-only", action="store_true",
                   help="re-verify the ONNX files already in --out against the source and print the result; "
                   "read-only: writes nothing, not even the report (default: off)")
    p.add_argument("--if-stale", action="store_true", help="do nothing when --out already holds a verified export "
                   "of this exact source and these options (--run: and these data files, its run trained on them); "
                   "else say why it exports again (default: off)")
    p.add_argument("--no-merge", action="store_true", help="keep train-time branches of one input (RepVGG, MobileOne, "
                   "FastViT blocks) as they are, e.g. for quantization-aware training, instead of merging each block "
                   "into one conv (default: merge, proven exact in float64; docs/export.md)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv, fixed = list(sys.argv[1:] if argv is None else argv), []
    while argv:  # `--input-range -1,1`: argparse would take -1,1 for a flag
        arg = argv.pop(0)
        if arg == "--input-range" and argv and re.match(r"-[\d.]", argv[0]):
            arg = f"--input-range={argv.pop(0)}"
        fixed.append(arg)
    return build_parser().parse_args(fixed)


def make_source(args: argparse.Namespace):
    byo_flags = {"layout", "input_range", "labels", "sample", "samples", "class_output", "name", "background"}
    given = {flag for flag in ("weights", "input_shape", *sorted(byo_flags)) if getattr(args, flag) is not None}
    if args.data_dir != DEFAULT_DATA_DIR:
        given.add("data_dir")
    allowed = ({"weights", "input_shape", *byo_flags} if args.model else byo_flags if args.onnx else {"data_dir"})
    for flag in sorted(given - allowed):
        users = {"weights": "--model", "input_shape": "--model", "data_dir": "--run"}.get(flag, "--model and --onnx")
        raise BadInput(f"--{flag.replace('_', '-')} applies to {users} only")
    if args.model:
        for flag in ("weights", "input_shape"):
            if getattr(args, flag) is None:
                raise BadInput(f"--model needs --{flag.replace('_', '-')}")
    from export.sources import from_onnx, from_pytorch, from_run  # torch & co. load here, after the flag checks

    if args.model:
        return from_pytorch(args.model, args.weights, args.input_shape, args.layout, args.input_range, args.labels,
                            args.sample, args.name, args.background, args.samples, args.class_output)
    if args.onnx:
        return from_onnx(args.onnx, args.labels, args.input_range, args.sample, args.layout, args.name, args.background,
                         args.samples, args.class_output)
    return from_run(args.run or DEFAULT_RUN, args.data_dir)


def int8_options(args: argparse.Namespace, source):
    """export.int8.Options from the INT8 flags (None without --int8); bad values are BadInput."""
    if not args.int8:
        return None
    from export.int8 import Options, parse_max_drop, prepare

    options = Options(calib=args.calib, max_drop=0.5 if args.max_drop is None else parse_max_drop(args.max_drop),
                      equalize=not args.no_equalize, absorb=not args.no_absorb,
                      bias_correction=not args.no_bias_correction, types=args.int8_types or "auto",
                      data_dir=args.data_dir)
    options = prepare(options, source)
    source.request["int8"] = options.request()
    return options


def check_int8_flags(args: argparse.Namespace) -> None:
    """The INT8 flags alone, before any model is loaded."""
    flags = {"calib": args.calib, "max_drop": args.max_drop, "no_equalize": args.no_equalize or None,
             "no_absorb": args.no_absorb or None, "no_bias_correction": args.no_bias_correction or None,
             "int8_types": args.int8_types}
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if given and not args.int8:
        raise BadInput(f"{given[0]} applies to --int8 only")
    if args.int8 and args.verify_only:
        raise BadInput("--int8 with --verify-only: re-verifying an INT8 model is not supported; export again")
    if args.max_drop is not None:
        from export.int8 import parse_max_drop
        parse_max_drop(args.max_drop)
    if args.int8_types is not None:
        from export.int8_quant import TYPES
        if args.int8_types not in TYPES:
            raise BadInput(f"--int8-types {args.int8_types!r}: want one of {', '.join(TYPES)}")


def internal_error(e: BaseException) -> int:
    """Exit 3: one line that says it is a bug of ours, not the user's input, and where the traceback is."""
    fd, path = tempfile.mkstemp(prefix="bnfold-export-", suffix=".traceback.txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"python -m export {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(e, file=f)
    print(f"export: internal error, a bug in bnfold and not your input ({type(e).__name__}: {one_line(e, 300)}); "
          f"nothing published; the traceback is in {path} (please report it)", file=sys.stderr)
    return 3


def main(argv=None) -> int:
    """0 published (or verified), 1 a check failed, 2 bad input (one line), 3 internal error (export/errors.py)."""
    try:  # reading the user's input: any error here is the input's
        args = parse_args(argv)
        out = Path(args.out)
        check_int8_flags(args)
        source = make_source(args)
        source.request["merge"] = not args.no_merge
        int8 = int8_options(args, source)
    except (BadInput, FileNotFoundError, DataError, ValueError, onnx.checker.ValidationError) as e:
        print(f"export: {one_line(e, limit=600)}", file=sys.stderr)
        return 2
    except Exception as e:
        return internal_error(e)
    from export.fold import FoldError
    from export.pipeline import REPORT, export, why_export

    try:  # folding, exporting, verifying: the user's input still can be at fault (BadInput: an untraceable model,
        # FoldError: a BN that normalizes with batch statistics), anything else is a bug of ours
        if args.if_stale:
            why = why_export(source, out)
            if why is None:
                print(f"export: {out / 'model.onnx'} is already a verified export of {source.path}"
                      + (" and the data it was verified on" if source.kind == "run" else "") + "; reused")
                return 0
            print(f"export: exporting {source.path}: {why}")
        code = export(source, out, verify_only=args.verify_only, merge=not args.no_merge, int8=int8)
    except (BadInput, FoldError) as e:
        print(f"export: {one_line(e, limit=600)}", file=sys.stderr)
        return 2
    except Exception as e:
        return internal_error(e)
    if code:
        print("export: verification failed; the table above says where (--verify-only: nothing written)" if args.verify_only
              else f"export: verification failed; see {out / REPORT}; {published_after_failure(out / REPORT)}",
              file=sys.stderr)
    return code


def published_after_failure(report_path: Path) -> str:
    """What a failed export left published: nothing, or the FP32 files when only INT8 failed."""
    import json

    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return "no model written"
    if report.get("files"):
        return f"published {', '.join(report['files'])} (FP32); INT8 not published: {report['int8'].get('failed_step')}"
    return "no model written"


if __name__ == "__main__":
    sys.exit(main())
