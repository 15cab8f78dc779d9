"""One onnxruntime session over a checked model (service/contract.py), and what it answers.

Only numpy and onnxruntime here: the service never imports torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from .contract import Contract, ModelLoadError

logger = logging.getLogger("bentoml.service.model")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_SETTINGS = ("auto", "cpu", "cuda")


def choose_providers(setting: str, available: Sequence[str]) -> list[str]:
    """`auto` prefers CUDA when onnxruntime-gpu offers it (the session still falls back to CPU when
    no GPU is usable, see `active_device`); `cuda` insists on it; `cpu` never touches it."""
    setting = setting.lower()
    if setting not in PROVIDER_SETTINGS:
        raise ModelLoadError(f"ORT_PROVIDER must be one of {', '.join(PROVIDER_SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if setting == "cuda":
        raise ModelLoadError("ORT_PROVIDER=cuda but onnxruntime offers no CUDAExecutionProvider "
                             "(install the `gpu` extra: onnxruntime-gpu)")
    return [CPU]


def active_device(setting: str, session_providers: Sequence[str]) -> str:
    """'cuda' or 'cpu': what the session really runs on; forced cuda that fell back is an error."""
    if CUDA in session_providers:
        return "cuda"
    if setting.lower() == "cuda":
        raise ModelLoadError("ORT_PROVIDER=cuda but no GPU is usable (onnxruntime fell back to CPU)")
    return "cpu"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


class Model:
    """The session plus the contract; `run()` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, contract: Contract, model_bytes: bytes, provider: str = "auto",
                 intra_op_threads: int = 1, chunk_images: int = 32, ort: Any = None, timed_runs: int = 3) -> None:
        if ort is None:  # injectable so provider selection can be tested with a fake onnxruntime
            import onnxruntime as ort

        self.contract = contract
        requested = choose_providers(provider, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        # Spinning intra-op threads would steal the core the HTTP event loop needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=requested)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {contract.path}: {str(exc).splitlines()[0]}") from None
        self.providers = list(self.session.get_providers())
        self.device = active_device(provider, self.providers)
        self.provider_setting = provider
        self.intra_op_threads = options.intra_op_num_threads
        self.chunk_images = max(1, int(chunk_images))
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if contract.input_name not in inputs or not set(contract.output_names) <= outputs:
            raise ModelLoadError(f"onnxruntime sees inputs {sorted(inputs)} / outputs {sorted(outputs)}, "
                                 f"the metadata names {contract.input_name!r} / {list(contract.output_names)}")
        self.output_names = list(contract.output_names)
        self.seconds_per_sample = self._warm_up(timed_runs)

    def _warm_up(self, timed_runs: int) -> float:
        """Run one sample (the first run is the slow one), check every output is batch first with
        the contract's shape (at batch sizes 1 and 2); seconds per sample (the median of
        `timed_runs` more; 0 runs: not timed, the caller knows it)."""
        low = self.contract.input_range[0] if self.contract.input_range else 0.0
        try:
            for n in (2, 1):
                batch = np.full((n, *self.contract.sample_shape), low, np.float32)
                for output, array in zip(self.contract.outputs, self._run(batch)):
                    if array.shape != (n, *output.shape[1:]) or array.dtype != np.float32:
                        raise ModelLoadError(
                            f"output {output.name!r} of {n} input(s) is {array.dtype} {list(array.shape)}, the contract "
                            f"wants float32 {[n, *output.shape[1:]]}" + (" (one score per label)" if output.name ==
                                                                          self.contract.output_name else ""))
            times = []
            for _ in range(timed_runs):
                start = time.perf_counter()
                self._run(batch)
                times.append(time.perf_counter() - start)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot run {self.contract.path} on a "
                                 f"{list(batch.shape)} input: {str(exc).splitlines()[0]}") from None
        return sorted(times)[len(times) // 2] if times else 0.0

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.contract.input_name: batch})

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """batch: validated float32 [N, *sample_shape]; returns every output of the contract, in its
        order, each float32 [N, ...] (a classifier's class scores at `contract.class_index`).

        Big batches run in chunks: past a few dozen images the activations stop fitting in cache
        and the cost per image doubles (seed-cnn, 1 thread: 1024 images in one call 14k img/s,
        in chunks of 32 32k img/s; measured for issue 4)."""
        n, chunk = batch.shape[0], self.chunk_images
        if n <= chunk:
            return self._run(batch)
        parts = [self._run(batch[i : i + chunk]) for i in range(0, n, chunk)]
        return [np.concatenate(arrays) for arrays in zip(*parts)]

    def probabilities(self, output: np.ndarray) -> np.ndarray:
        """Softmax of logits; a `probabilities` output as it is (never softmaxed twice)."""
        if self.contract.output_kind == "probabilities":
            return output
        return softmax(output.copy())
