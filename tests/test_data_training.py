"""IDX reading (real and broken files), the split, seeded training and safetensors round trips."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from training import data
from training.artifacts import load_run, save_run
from training.models import build


def write_idx(path, array: np.ndarray, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_real_data_shapes_and_ranges(data_dir):
    images, labels = data.load_split(data_dir, "test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 == images.min() and images.max() == 1.0
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    train_images, _ = data.load_split(data_dir, "train")
    assert train_images.shape == (60000, 1, 28, 28)
    # The normalization constants baked into the models are this training set's statistics.
    from training.models import PIXEL_MEAN, PIXEL_STD
    assert abs(train_images.mean() - PIXEL_MEAN) < 1e-3 and abs(train_images.std() - PIXEL_STD) < 1e-3


def test_plain_and_gzipped_idx_read_the_same(tmp_path):
    array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "a", array)
    (tmp_path / "a.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes()))
    assert np.array_equal(data.read_idx(tmp_path / "a"), array)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], "file holds"),                      # truncated data
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: b"\x01" + raw[1:], "bad magic"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "dtype code"),
])
def test_corrupt_idx_gets_a_clear_error(tmp_path, damage, message):
    write_idx(tmp_path / "x", np.zeros((3, 28, 28)))
    (tmp_path / "x").write_bytes(damage((tmp_path / "x").read_bytes()))
    with pytest.raises(data.DataError, match=message):
        data.read_idx(tmp_path / "x")


def test_truncated_gzip_gets_a_clear_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((3, 28, 28)))
    (tmp_path / "x.gz").write_bytes(gzip.compress((tmp_path / "x").read_bytes())[:40])
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(tmp_path / "x.gz")


def test_mismatched_labels_and_missing_files(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(data.DataError, match="3 images but labels"):
        data.load_split(tmp_path, "test")
    with pytest.raises(data.DataError, match="no train-images"):
        data.load_split(tmp_path, "train")


def test_split_is_disjoint_and_seeded():
    train_a, val_a = data.train_val_split(1000, 100, seed=3)
    train_b, val_b = data.train_val_split(1000, 100, seed=3)
    assert np.array_equal(val_a, val_b) and len(set(train_a) | set(val_a)) == 1000 and not set(train_a) & set(val_a)
    assert not np.array_equal(val_a, data.train_val_split(1000, 100, seed=4)[1])


def test_training_is_reproducible_and_weights_round_trip(tmp_path, data_dir):
    from training.train import train

    cfg = {"arch": "mlp-bn", "epochs": 1, "subset": 2000, "val_size": 500, "seed": 5}
    model_a, cfg_a = train(cfg, data_dir, progress=False)
    model_b, cfg_b = train(cfg, data_dir, progress=False)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    saved = save_run(tmp_path / "run", model_a, cfg_a)
    loaded, loaded_cfg = load_run(tmp_path / "run")
    assert loaded_cfg["weights_sha256"] == saved["weights_sha256"]
    assert loaded_cfg["metrics"]["test_accuracy"] > 0.5
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model_a.eval()(x))
    # Weights are safetensors (a JSON header, no pickle opcodes).
    raw = (tmp_path / "run" / "weights.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8:8 + header_len])) >= set(model_a.state_dict())


def test_load_run_rejects_tampered_weights(tmp_path):
    save_run(tmp_path, build("mlp-bn"), {"arch": "mlp-bn", "dropout": True})
    raw = bytearray((tmp_path / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match"):
        load_run(tmp_path)


def test_training_cli_bad_data_dir_is_one_line(tmp_path, capsys):
    from training.__main__ import main

    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("training:") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_ablation_swaps_dropout_for_identity():
    assert any(isinstance(m, torch.nn.Dropout) for m in build("seed-cnn"))
    assert not any(isinstance(m, torch.nn.Dropout) for m in build("seed-cnn", dropout=False))


def test_random_shift_moves_each_image_within_bounds_and_fills_with_zero():
    from training.train import random_shift

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28) + 0.5  # no zeros inside the images
    shifted = random_shift(x, 2, g)
    assert shifted.shape == x.shape
    moves = set()
    for original, moved in zip(x, shifted):
        # Find the (dy, dx) that reproduces this image: exactly one must exist.
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved, torch.roll(torch.nn.functional.pad(original, (2, 2, 2, 2)), (dy, dx), (1, 2))[:, 2:30, 2:30])]
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) > 10  # per image, not one offset for the batch
    assert torch.equal(random_shift(x, 2, torch.Generator().manual_seed(0)), shifted)  # seeded


def test_uint8_path_is_the_float_path(data_dir):
    """Training keeps uint8 in memory and converts per batch; the bits must be load_split's."""
    images, labels = data.load_split(data_dir, "test")
    raw, raw_labels = data.load_split_uint8(data_dir, "test")
    assert raw.dtype == np.uint8 and raw.shape == (10000, 28, 28) and np.array_equal(labels, raw_labels)
    batch = np.array([0, 17, 9999, 42])
    assert torch.equal(data.to_float(torch.from_numpy(raw[batch])), torch.from_numpy(images[batch]))
    assert np.array_equal(data.to_float(raw[batch]), images[batch])


def _seed_with_negative_gammas(dtype):
    torch.manual_seed(0)
    seed = build("seed-cnn").to(dtype)
    with torch.no_grad():  # BN scales of both signs: the lean pool must take the min for a < 0
        seed[2].weight.uniform_(-1.5, 1.5)
        seed[2].bias.normal_()
        seed[2].running_mean.normal_()
        seed[2].running_var.uniform_(0.5, 2.0)
    x = torch.rand(32, 1, 28, 28, dtype=dtype)
    x[:8, :, :6] = 0  # flat background: ties inside pooling windows
    return seed, x


def _lean_grads(lean):
    """LeanSeedCNN's gradients under the seed's names and layouts (None = exactly zero)."""
    grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad) for k, p in lean.named_parameters()}
    return {"1.weight": grads["filters"].T.reshape(32, 1, 3, 3), "1.bias": grads["conv_bias"],
            "2.weight": grads["bn_weight"], "2.bias": grads["bn_bias"],
            "6.weight": grads["fc1_weight"].view(-1, 14, 14, 32).permute(0, 3, 1, 2).reshape(-1, 6272),
            "6.bias": grads["fc1_bias"], "9.weight": grads["fc2_weight"], "9.bias": grads["fc2_bias"]}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_lean_seed_cnn_is_the_seed_cnn(mode, dtype, tol):
    """Same outputs, gradients and BN running statistics as the seed's own layers (dropout on in
    train mode, the same random masks). float64 shows the formulations are the same math; float32
    is what training runs (compared with a float64 seed, as the float32 seed itself is)."""
    import copy

    from training.models import LeanSeedCNN

    seed, x = _seed_with_negative_gammas(torch.float64)
    reference = copy.deepcopy(seed).train(mode == "train")
    lean = LeanSeedCNN(copy.deepcopy(seed).to(dtype)).train(mode == "train")
    assert set(lean.seed_state_dict()) == set(seed.state_dict())
    torch.manual_seed(1)
    y_ref = reference(x)
    torch.manual_seed(1)
    y = lean(x.to(dtype))
    scale = y_ref.abs().max().item()
    assert (y.double() - y_ref).abs().max().item() < tol * scale
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.to(dtype))
    grads = _lean_grads(lean)
    for name, p in reference.named_parameters():
        size = p.grad.abs().max().item()
        assert (grads[name].double() - p.grad).abs().max().item() <= tol * max(size, 1.0), name
    state = lean.seed_state_dict()
    for name, value in reference.state_dict().items():
        assert state[name].shape == value.shape, name
        assert torch.allclose(state[name].double(), value.double(), rtol=tol, atol=tol), name


def test_lean_seed_cnn_round_trips_the_seed_weights_exactly():
    from training.models import LeanSeedCNN

    seed, _ = _seed_with_negative_gammas(torch.float32)
    for name, value in LeanSeedCNN(seed).seed_state_dict().items():
        assert torch.equal(value, seed.state_dict()[name]), name


def test_lean_seed_cnn_training_is_reproducible(data_dir):
    from training.train import train

    cfg = {"arch": "seed-cnn", "epochs": 1, "subset": 1500, "val_size": 500, "seed": 3, "threads": 2}
    model_a, cfg_a = train(cfg, data_dir, progress=False)
    model_b, _ = train(cfg, data_dir, progress=False)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert cfg_a["metrics"]["test_accuracy"] > 0.5


@pytest.mark.parametrize("lean", [True, False])
def test_weight_average_follows_the_live_weights_by_the_decay(lean):
    from training.models import LeanSeedCNN
    from training.train import WeightAverage

    torch.manual_seed(0)
    seed = build("seed-cnn")
    net = LeanSeedCNN(seed) if lean else seed
    average = WeightAverage(net, 0.9)
    assert average.model is not net
    before = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():  # a "step": every float tensor of the live net moves, BN statistics included
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
    average.update()
    live = net.state_dict()
    moved = 0
    for name, value in average.model.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * before[name] + 0.1 * live[name]
            assert torch.allclose(value, expected, atol=1e-6), name
            moved += not torch.equal(value, before[name])
        else:
            assert torch.equal(value, before[name]), name
    assert moved >= 8  # weights, biases and running statistics all moved
    assert WeightAverage(net, 0.0).model is net


def test_training_with_weight_average_keeps_the_averaged_model(data_dir):
    from training.train import train

    cfg = {"arch": "seed-cnn", "epochs": 1, "subset": 1500, "val_size": 500, "seed": 3, "threads": 2}
    plain, _ = train(cfg, data_dir, progress=False)
    averaged, cfg_ema = train({**cfg, "ema": 0.9}, data_dir, progress=False)
    # same batches and steps; the kept weights are the average, not the last step's
    assert not torch.equal(plain.state_dict()["6.weight"], averaged.state_dict()["6.weight"])
    assert cfg_ema["ema"] == 0.9 and cfg_ema["metrics"]["test_accuracy"] > 0.3


def test_recipes_table_trains_each_recipe_and_seed(tmp_path, data_dir):
    from training import recipes

    out = tmp_path / "recipes"
    argv = ["--recipes", "before,default@0+1", "--seeds", "0", "--epochs", "1", "--subset", "600", "--quiet",
            "--data-dir", str(data_dir), "--out", str(out)]
    assert recipes.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in result["rows"]] == [("before", 0), ("default", 0), ("default", 1)]
    assert result["recipes"]["before"]["lean"] is False and result["recipes"]["default"]["lean"] is True
    assert all(r["epochs_run"] == 1 and 0.1 < r["test_accuracy"] <= 1 for r in result["rows"])
    assert result["rows"][1]["test_accuracy"] != result["rows"][2]["test_accuracy"]  # the seed matters
    text = (out / "results.md").read_text()
    assert "**default, mean of 2**" in text and "before, mean" not in text
    assert (out / "recipes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ("nope", "default@1+x", ","):
        assert recipes.main(["--recipes", bad, "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
