"""Reading what a user hands `python -m export`: a model factory (Python the user asked us to run),
its weights (safetensors, or torch.load(weights_only=True): never a full unpickle) and an ONNX file.
Everything that can be wrong with them is raised as BadInput, one line naming the file and why.
"""
import collections
import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
import traceback
from pathlib import Path

import onnx
import torch
from torch import nn

from export.contract import MIN_OPSET
from export.errors import BadInput, one_line


ZOO_PACKAGES = ("torchvision", "timm", "ultralytics")  # need torch 2.14.x: their own venv (make setup-zoo)


def missing_module(target: str, error: ModuleNotFoundError) -> str:
    """Which package to install for `target`, in words."""
    top = (error.name or target).split(".")[0]
    if top in ZOO_PACKAGES:
        return (f"{top} is not installed in this Python ({sys.executable}); it needs torch 2.14.x beside it, which "
                f"this venv's torch {torch.__version__.split('+')[0]} is not: `make setup-zoo` makes .venv-zoo (torch "
                f"2.14.1, torchvision 0.29.1, timm; ~5.5 GB once), then run the same command with "
                f".venv-zoo/bin/python -m export ... (docs/zoo.md)")
    if top != target.split(".")[0]:  # the module exists, one of its imports does not
        return f"importing {target} needs {top}, which is not installed: pip install it into this venv"
    return (f"cannot import {target} (no module named {top!r}); give FILE.py:FACTORY, pip install the package that "
            f"provides it, or put it on PYTHONPATH")


def load_factory(spec: str) -> nn.Module:
    """`path/to/file.py:FACTORY` or `package.module:FACTORY` -> FACTORY(), which must be an nn.Module."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise BadInput(f"--model {spec!r}: want FILE.py:FACTORY or package.module:FACTORY")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise BadInput(f"--model {spec}: {path} does not exist")
        name = "bnfold_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module  # dataclasses and friends look their module up by name
        sys.path.insert(0, str(path.resolve().parent))  # so it can import its neighbours
        try:
            spec_.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            sys.modules.pop(name, None)
            raise BadInput(f"--model {spec}: importing {path} raised {type(e).__name__}: {one_line(e)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise BadInput(f"--model {spec}: {missing_module(target, e)}") from None
        except (Exception, SystemExit) as e:
            raise BadInput(f"--model {spec}: importing {target} raised {type(e).__name__}: {one_line(e)}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise BadInput(f"--model {spec}: {target} has no {attr!r} (callables it defines: {', '.join(public[:12]) or 'none'})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise BadInput(f"--model {spec}: {attr} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise BadInput(f"--model {spec}: {attr}() raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {spec}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a .pt/.pth state_dict through torch.load(weights_only=True) (never a full
    unpickle); a {"state_dict": ...} / {"model": ...} checkpoint wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--weights {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise BadInput(f"--weights {path}: not a readable safetensors file ({one_line(e)})") from None
    if suffix not in (".pt", ".pth"):
        raise BadInput(f"--weights {path}: want .safetensors, .pt or .pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise BadInput(f"--weights {path}: torch.load(weights_only=True) refuses it"
                       + (f" (it pickles {why.group(1)})" if why else f" ({one_line(e)})")
                       + "; save model.state_dict() or a safetensors file instead") from None
    except Exception as e:
        raise BadInput(f"--weights {path}: torch.load cannot read it ({one_line(e)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInput(f"--weights {path}: holds a {type(state).__name__} that is not a state_dict (names -> tensors)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """load_state_dict, with every mismatch in one line: the first missing and unexpected keys,
    and tensors whose shapes differ. BN's num_batches_tracked may be absent (eval never reads it)."""
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in expected and not k.endswith("num_batches_tracked"))
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f", … {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise BadInput(f"--weights {path} does not match the model: " + "; ".join(problems))
    # A state dict from model.state_dict() carries each module's version in `_metadata`, which some
    # modules' _load_from_state_dict checks (torchvision's MNASNet); safetensors files carry none,
    # so the fresh module's own versions stand in: the file was saved from this architecture.
    state = collections.OrderedDict(state)
    state._metadata = getattr(expected, "_metadata", None)
    try:
        model.load_state_dict(state, strict=False)
    except Exception as e:
        raise BadInput(f"--weights {path}: loading it into {_raising_module(model, e)} raised {type(e).__name__}: "
                       f"{one_line(e)}") from None


def _raising_module(model: nn.Module, error: Exception) -> str:
    """The innermost submodule of `model` whose method the error passed through ("features.3 (MNASNet)")."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
    if found is None:
        return type(model).__name__
    return f"{names[id(found)] or '<top level>'} ({type(found).__name__})"


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and validate a graph; external data is read in so the result is self-contained."""
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--onnx {path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise BadInput(f"--onnx {path}: not an ONNX file ({one_line(e)})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise BadInput(f"--onnx {path}: not an ONNX model (no graph in it)")
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]
    for tensor in tensors:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not (path.parent / location).is_file():
                raise BadInput(f"--onnx {path}: tensor {tensor.name!r} is stored in external data file "
                               f"{location!r}, which is missing (it must sit next to the model)")
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as e:
        raise BadInput(f"--onnx {path}: cannot read its external data ({one_line(e)})") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BadInput(f"--onnx {path}: the ONNX checker rejects it: {one_line(' '.join(str(e).split()))}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise BadInput(f"--onnx {path}: opset {opset}; the contract needs >= {MIN_OPSET} "
                       f"(onnx.version_converter.convert_version(model, {MIN_OPSET}) can convert it)")
    return model
