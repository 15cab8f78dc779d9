"""The service serves INT8 only where it is proven (issue 24 item 4, service/precision.py): PRECISION=int8|fp32|auto,
the start-up fingerprint check on this host, and a wrong INT8 model with a fresh .sha256 refused (FP32 served, the
reason in /metadata and the log)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.config import Settings
from service.contract import load_contract
from service.precision import choose
from service_helpers import build_model, serve
from test_int8 import tamper

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def _copy(src: Path, dst: Path, names=("model.onnx", "model_int8.onnx", "model_int8.fingerprint.npz")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in ("", ".sha256"):
            shutil.copy(src / (name + suffix), dst / (name + suffix))
    return dst


def _resign(path: Path, data: bytes) -> None:
    """The file replaced and given a fresh, matching .sha256: the checksum alone no longer tells."""
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def _choose(directory: Path, precision: str) -> tuple[bytes, dict]:
    contract, data = load_contract(directory / "model.onnx")
    return choose(contract, data, Settings(precision=precision))


def test_int8_is_served_when_its_check_passes_here_and_fp32_when_asked(int8_dir):
    data, info = _choose(int8_dir, "int8")
    assert info["what"] == "int8" and data == (int8_dir / "model_int8.onnx").read_bytes()
    check = info["check"]["outputs"]["logits"]
    assert check["rms_vs_export"] <= 0.1 * check["int8_error_rms"] and check["top1_agreement_with_export"] >= 0.99
    assert info["seconds"] <= 2.0, "the start-up check takes at most 2 s"
    data, info = _choose(int8_dir, "fp32")
    assert info == {**info, "what": "fp32", "why": "PRECISION=fp32"} and data == (int8_dir / "model.onnx").read_bytes()
    data, info = _choose(int8_dir, "auto")  # faster here at batch 1 and 32, or FP32 with the figures
    faster = all(t["int8_vs_fp32"] >= 1.05 for t in info["speed"].values())
    assert info["what"] == ("int8" if faster else "fp32") and "1" in info["speed"] and 1 <= len(info["speed"]) <= 2
    assert ("faster" in info["why"]) if faster else ("not 1.05x as fast" in info["why"])


@pytest.mark.parametrize("how", ["scale", "zero-point"])
def test_a_wrong_int8_model_with_a_fresh_sha256_is_refused_at_start(how, int8_dir, tmp_path):
    directory = _copy(int8_dir, tmp_path / how)
    _resign(directory / "model_int8.onnx", tamper(onnx.load(directory / "model_int8.onnx"), how).SerializeToString())
    data, info = _choose(directory, "int8")
    assert info["what"] == "fp32" and data == (directory / "model.onnx").read_bytes()
    assert "fingerprint check failed" in info["why"] and "allowed 0.1x" in info["why"]


def test_int8_beside_another_model_or_missing_is_refused(int8_dir, tmp_path):
    _, info = _choose(_copy(int8_dir, tmp_path / "fp32-only", names=("model.onnx",)), "int8")
    assert info["what"] == "fp32" and "no INT8 model beside" in info["why"]
    other = _copy(int8_dir, tmp_path / "other")
    build_model(other, "fmnist-v1")  # another FP32 model.onnx (same contract), the INT8 files left beside it
    _, info = _choose(other, "int8")
    assert info["what"] == "fp32" and "made from another model" in info["why"]
    broken = _copy(int8_dir, tmp_path / "fingerprint")
    _resign(broken / "model_int8.fingerprint.npz", b"not an npz")
    _, info = _choose(broken, "int8")
    assert info["what"] == "fp32" and "not the fingerprint" in info["why"]


def test_make_serve_precision_int8_serves_it_and_says_so(int8_dir, tmp_path, test_images):
    images = test_images[0][:16]
    with serve(int8_dir / "model.onnx", tmp_path / "serve.log", PRECISION="int8", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        meta = httpx.get(f"{proc.url}/metadata", timeout=10).json()
        precision = meta["runtime"]["precision"]
        assert precision["what"] == "int8" and precision["setting"] == "int8" and precision["check"]["rows"] >= 8
        answer = httpx.post(f"{proc.url}/predict", json={"images": images.tolist()}, timeout=30).json()
    session = ort.InferenceSession(str(int8_dir / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"image": images})[0].argmax(1)
    assert [p["class_id"] for p in answer["predictions"]] == want.tolist()
    assert "INT8" in (tmp_path / "serve.log").read_text()


def test_a_decision_handed_down_is_honoured_only_for_the_file_it_checked(int8_dir, tmp_path):
    directory = _copy(int8_dir, tmp_path / "decided")
    contract, data = load_contract(directory / "model.onnx")
    settings = Settings(precision="int8")
    served, decided = choose(contract, data, settings)
    assert decided["what"] == "int8"
    again, info = choose(contract, data, settings, decided=decided)
    assert info is decided and again == served  # no second check
    _resign(directory / "model_int8.onnx", tamper(onnx.load(directory / "model_int8.onnx"), "scale").SerializeToString())
    again, info = choose(contract, data, settings, decided=decided)  # another file since: decided again, refused
    assert info["what"] == "fp32" and "fingerprint check failed" in info["why"] and again == data


def test_the_model_store_keeps_the_int8_form_so_a_bento_can_serve_it(int8_dir, tmp_path):
    """`make bento` stores model.onnx with its INT8 files; the stored copy passes the same start-up check, and
    a store entry without them (FP32 only) is another version."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    fp32_only = _copy(int8_dir, tmp_path / "fp32", names=("model.onnx",))

    def store(directory: Path) -> str:
        return subprocess.run([sys.executable, "-m", "service.store", str(directory / "model.onnx")], cwd=REPO,
                              env=env, capture_output=True, text=True, check=True).stdout.strip()

    with_int8, without = store(int8_dir), store(fp32_only)
    assert with_int8 != without and with_int8.split(":")[0] == without.split(":")[0]
    stored = tmp_path / "home" / "models" / with_int8.replace(":", "/")
    assert sorted(p.name for p in stored.iterdir() if p.name != "model.yaml") == sorted(
        p.name for p in int8_dir.iterdir() if p.name.startswith("model.onnx") or p.name.startswith("model_int8"))
    data, info = _choose(stored, "int8")
    assert info["what"] == "int8" and data == (int8_dir / "model_int8.onnx").read_bytes()
    assert not any(p.name.startswith("model_int8") for p in (tmp_path / "home" / "models" / without.replace(":", "/")).iterdir())
