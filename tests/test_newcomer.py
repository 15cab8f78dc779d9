"""Issue 26, items 4, 6 and 7, as a newcomer meets them: the --model error for torchvision says which
command installs it; the ONNX example file exports; `make serve` listens on 127.0.0.1 unless told;
`make bento` says how to run what it built; `make setup-zoo` exists; the README's links and commands
that name files point at files that exist."""
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from export.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_the_torchvision_example_says_which_command_installs_it(tmp_path, capsys):
    code = main(["--model", "torchvision.models:resnet50", "--weights", str(tmp_path / "w.safetensors"),
                 "--input-shape", "3,224,224", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "torchvision is not installed in this Python" in err and "make setup-zoo" in err
    assert ".venv-zoo/bin/python -m export" in err and not (tmp_path / "out").exists()


def test_the_onnx_example_file_exports(tmp_path, capsys):
    """README "Serve your own model": the ONNX file shipped to try --onnx with folds both BNs and verifies."""
    out = tmp_path / "out"
    assert main(["--onnx", str(ROOT / "examples/onnx/fashion_cnn.onnx"), "--labels", str(ROOT / "examples/onnx/labels.txt"),
                 "--background", "dark", "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["passed"] and len(report["fold"]["folded"]) == 2 and not report["fold"]["kept"]
    assert report["labels"][9] == "Ankle boot"


def make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_make_serve_listens_on_this_machine_unless_told_and_bento_says_how_to_run_it():
    assert "--host 127.0.0.1 --port 3000" in make_n("serve", "MODEL_PATH=README.md")
    assert "--host 0.0.0.0 --port 3001" in make_n("serve", "MODEL_PATH=README.md", "HOST=0.0.0.0", "PORT=3001")
    assert "bentoml serve bnfold-classifier:latest" in make_n("bento", "MODEL_PATH=README.md")
    help_text = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "make setup-zoo" in help_text and "HOST=127.0.0.1" in help_text
    zoo = make_n("setup-zoo")  # the torchvision/timm venv: its commands, or nothing to do when it is there
    assert "torch==2.14.1 torchvision==0.29.1" in zoo or "Nothing to be done" in zoo or zoo == "", zoo


def test_the_readme_links_and_files_exist_and_it_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    for path in re.findall(r"\b((?:examples|docs|scripts)/[\w./-]+\.\w+)", readme):
        assert (ROOT / path).exists(), path
    assert "docs/troubleshooting.md" in readme and "make setup-zoo" in readme
    assert "make examples MODEL_PATH=" in readme and "make loadtest MODEL_PATH=" in readme
