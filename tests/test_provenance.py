"""Issue 26, 2: a training run remembers what it was trained on (the data files' sha256, the recipe, the seed);
`python -m training --if-stale` (what `make pipeline` runs) trains again when any of them changed and says
why; an export is stale when its run is (or when the data it was verified on changed)."""
import gzip
import json
import shutil

import numpy as np

from training.__main__ import main as train_main
from training.data import FILES, find_file


def changed_copy(data_dir, target):
    """The four files, one label of the training set changed (the other three linked, not copied)."""
    target.mkdir()
    for name in (n for pair in FILES.values() for n in pair):
        source = find_file(data_dir, name)
        if name == "train-labels-idx1-ubyte":
            raw = bytearray((gzip.open if source.suffix == ".gz" else open)(source, "rb").read())
            raw[8] = (raw[8] + 1) % 10  # the first image's label
            (target / name).write_bytes(bytes(raw))
        else:
            (target / source.name).symlink_to(source)
    return target


def test_a_run_is_trained_again_when_its_data_recipe_or_seed_change_and_says_why(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    base = ["--arch", "seed-cnn", "--epochs", "1", "--subset", "500", "--val-size", "200", "--out", str(run),
            "--quiet", "--if-stale"]

    def train(*extra, data=data_dir):
        assert train_main([*base, "--data-dir", str(data), *extra]) == 0
        return capsys.readouterr().out, (run / "weights.safetensors").stat().st_mtime_ns

    out, first = train()
    assert "there is no run in" in out
    config = json.loads((run / "config.json").read_text())
    had = config["trained_on"]
    assert len(had["data"]["files"]) == 4 and had["seed"] == 0 and had["recipe"]["epochs"] == 1
    assert had["recipe"]["lr"] == 4e-3 and "threads" not in had["recipe"] and config["machine"]["isa"]

    out, again = train()  # nothing changed: reused, not trained
    assert "is current" in out and again == first

    other = changed_copy(data_dir, tmp_path / "my-idx")
    out, retrained = train(data=other)
    assert "the data changed: train-labels-idx1-ubyte in" in out and retrained != first
    assert json.loads((run / "config.json").read_text())["trained_on"]["data"]["dir"] == str(other)

    out, _ = train("--seed", "1", "--lr", "0.001", data=other)
    assert "the recipe changed: lr 0.004 → 0.001; the seed changed: 0 → 1" in out and "data changed" not in out
    out, _ = train("--seed", "1", "--lr", "0.001", data=other)
    assert "is current" in out


def test_an_export_is_stale_when_its_run_is_or_its_data_changed(trained_run, model_dir, data_dir, tmp_path):
    from export.pipeline import why_export
    from export.sources import STALE_RUN, from_run

    out = tmp_path / "export"
    shutil.copytree(model_dir, out)
    source = from_run(str(trained_run), str(data_dir))
    assert why_export(source, out) is None and not source.notes  # trained and verified on these files

    other = changed_copy(data_dir, tmp_path / "my-idx")
    source = from_run(str(trained_run), str(other))
    assert why_export(source, out) == "the data files differ from the ones it was verified on"
    assert source.notes[0].startswith(f"{STALE_RUN} {trained_run} was trained on other data ({data_dir}) than {other}")
    assert f"make pipeline DATA_DIR={other}" in source.notes[0]

    # verified on the new files already, its run still trained on the old ones: stale all the same
    report = json.loads((out / "export_report.json").read_text())
    report["request"] = json.loads(json.dumps(source.request))
    (out / "export_report.json").write_text(json.dumps(report))
    assert why_export(source, out).startswith(f"its run is stale ({trained_run} was trained on other data")
    assert np.array_equal(source.targets[:5], from_run(str(trained_run), str(data_dir)).targets[:5])
