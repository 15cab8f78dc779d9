"""Tracing a module with torch.fx for the fx passes, and checking the trace against the forward.

`trace` traces with a custom tracer: a submodule whose forward fx cannot trace (data-dependent
control flow, calls fx does not support) becomes a leaf, called whole, and tracing starts again.
`record_calls` runs the model once on an example with hooks, noting what each module that may be
traced receives and returns; `mistrace` runs a traced graph on those inputs (recording each node's
shape in node.meta["fold_shape"]) and says how its output differs from the forward's, if it does.
A trace that differs is not used (the passes fold inside that module's children instead).
"""
import traceback
from pathlib import Path

import torch
from torch import fx, nn

from export.errors import one_line


class FoldError(ValueError):
    """A model we refuse to fold; the message names the layer."""


class _LeafTracer(fx.Tracer):
    """fx's tracer with the named submodules, and every BatchNorm-like module, kept whole (called,
    not traced into). When tracing fails it remembers the innermost submodule whose forward raised."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves, self.failed_in = leaves, None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:  # a module built inside forward: blame its owner
                    pass
            raise


class Untraceable(Exception):
    """The module's own forward cannot be traced (not one of its submodules)."""


def trace(module: nn.Module, whole: set[str] = frozenset()) -> tuple[fx.GraphModule, dict[str, str]]:
    """Symbolic trace in which every submodule fx cannot trace becomes a leaf: trace, make the
    innermost module whose forward raised a leaf, trace again. Returns the graph and the leaves
    with fx's reason; the submodules named in `whole` are leaves from the start. Raises Untraceable
    when `module`'s own forward is what fails."""
    leaves: dict[str, str] = {}
    while True:
        tracer = _LeafTracer(set(leaves) | set(whole))
        try:
            graph = tracer.trace(module)
        except Exception as e:
            reason = one_line(e) + user_line(e)
            if not tracer.failed_in or tracer.failed_in in leaves:
                raise Untraceable(reason) from None
            leaves[tracer.failed_in] = reason
            continue
        return fx.GraphModule(tracer.root, graph, type(module).__name__), leaves


def user_line(error: Exception) -> str:
    """ " (at file.py:12: if x.sum() > 0:)": the last line outside torch that the error passed through."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)
              and f.filename != __file__]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""


def clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        items = [clone(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, clone(v)) for k, v in value.items())
    return value


def record_calls(model: nn.Module, example: tuple, holds) -> dict[str, tuple]:
    """(args, kwargs, output) of the first call of each module a pass may trace while model(*example)
    runs: the top level, and every module fx traces into for which `holds(module)` is true (one that
    holds something the pass rewrites)."""
    seen: dict[str, list] = {}
    tracer = fx.Tracer()
    traced = [(name, m) for name, m in model.named_modules() if not (name and tracer.is_leaf_module(m, name))
              and holds(m)]

    def before(name):
        def record(module, args, kwargs):
            seen.setdefault(name, [clone(args), clone(kwargs)])
        return record

    def after(name):
        def record(module, args, kwargs, output):
            if len(seen[name]) == 2:
                seen[name].append(clone(output))
        return record

    handles = [h for name, m in traced for h in (m.register_forward_pre_hook(before(name), with_kwargs=True),
                                                 m.register_forward_hook(after(name), with_kwargs=True))]
    try:
        with torch.no_grad():
            model(*example)
    except Exception as e:
        raise FoldError(f"the model raises on the example input: {one_line(e)}") from None
    finally:
        for h in handles:
            h.remove()
    return {name: tuple(call) for name, call in seen.items() if len(call) == 3}


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph node by node, noting each tensor's shape and dtype in node.meta["fold_shape"]
    and node.meta["fold_dtype"]."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["fold_shape"], n.meta["fold_dtype"] = tuple(out.shape), out.dtype
        return out


def mistrace(gm: fx.GraphModule, args: tuple, kwargs: dict, want) -> str | None:
    """How the traced graph's output on these inputs differs from `want`, what the module's forward
    gave (None: it does not)."""
    with torch.no_grad():
        try:
            got = gm(*clone(args), **clone(kwargs)) if kwargs else _ShapeRecorder(gm).run(*clone(args))
        except Exception as e:  # noqa: BLE001 -- any failure is the answer
            return f"it raises {type(e).__name__}: {one_line(e)}"
    return _difference(got, want, "its output")


def _difference(got, want, where: str) -> str | None:
    """How `got` differs from `want` in structure, shape, dtype or value beyond float rounding
    (1000 ulp of the largest value); None when it does not."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} is a {type(got).__name__}, not a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{where} is {got.dtype} {tuple(got.shape)}, not {want.dtype} {tuple(want.shape)}"
        if not want.is_floating_point():
            return None if torch.equal(got, want) else f"{where} differs"
        tol = 1e3 * torch.finfo(want.dtype).eps
        scale = float(want.abs().nan_to_num(0, 0, 0).max()) if want.numel() else 0.0
        if not torch.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True):
            return f"{where} differs by up to {float((got - want).abs().nan_to_num(0, 0, 0).max()):.3g}"
        return None
    if type(got) is not type(want):
        return f"{where} is a {type(got).__name__}, not a {type(want).__name__}"
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{where} has {len(got)} items, not {len(want)}"
        return next((d for i, (g, w) in enumerate(zip(got, want)) if (d := _difference(g, w, f"{where}[{i}]"))), None)
    if isinstance(want, dict):
        if list(got) != list(want):
            return f"{where} has the keys {list(got)}, not {list(want)}"
        return next((d for k in want if (d := _difference(got[k], want[k], f"{where}[{k!r}]"))), None)
    return None
