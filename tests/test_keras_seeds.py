"""Real Keras 3 exports (torch backend) of the two seed models, made here with random BatchNorm
statistics and no training, folded by export/onnx_fold.py: parity with Keras' own graph run with
ORT_DISABLE_ALL on real test images, and what is left of the BN afterwards."""
import numpy as np
import onnx
import pytest

from export.onnx_fold import fold_onnx
from export.onnx_graph import bn_derived_nodes, node_counts
from export.verify import compare, ort_session
from training import keras_seeds  # keras is in the dev extra: a missing keras fails here, it is not skipped

# Keras' torch backend converts tensors with np.array(x, copy=False) semantics numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def images(test_images):
    return np.ascontiguousarray(test_images[0].transpose(0, 2, 3, 1))  # [N, 28, 28, 1]: Keras' NHWC


def exported(tmp_path, name, positive):
    import keras

    keras.utils.set_random_seed(0)
    model = keras_seeds.SEEDS[name]()
    keras_seeds.randomize_bn(model, seed=1, positive=positive)
    path = keras_seeds.export_onnx(model, tmp_path / f"{name}.onnx")
    return model, onnx.load(path)


def check(model, raw, images):
    folded, report = fold_onnx(raw)
    onnx.checker.check_model(folded, full_check=True)
    assert [i.SerializeToString() for i in folded.graph.input] == [i.SerializeToString() for i in raw.graph.input]
    assert [o.SerializeToString() for o in folded.graph.output] == [o.SerializeToString() for o in raw.graph.output]
    name = raw.graph.input[0].name
    reference = ort_session(raw, optimize=False).run(None, {name: images})[0]
    # the export is Keras' model: sanity-check it against Keras itself first
    assert compare(reference, model.predict(images, verbose=0))["argmax_agreement"] == 1.0
    for optimize in (False, True):
        result = compare(ort_session(folded, optimize=optimize).run(None, {name: images})[0], reference)
        assert result["within_tolerance"] and result["argmax_agreement"] == 1.0, result
    one = ort_session(folded, optimize=False).run(None, {name: images[:1]})[0]  # the batch stays dynamic
    assert compare(one, reference[:1])["within_tolerance"]
    return folded, report


def test_keras_mlp_seed_bn_folds_forward_into_the_last_dense(tmp_path, images):
    model, raw = exported(tmp_path, "keras3-mlp", positive=False)
    assert bn_derived_nodes(raw) == 2  # Keras' Sub and Mul
    folded, report = check(model, raw, images)
    assert bn_derived_nodes(folded) == 0
    assert node_counts(folded) == {"Add": 2, "MatMul": 2, "Relu": 1, "Reshape": 1, "Softmax": 1}
    assert [f.direction for f in report["folded"]] == ["forward"] and report["kept"] == []


def test_keras_cnn_seed_positive_bn_folds_through_maxpool_and_nhwc_flatten(tmp_path, images):
    model, raw = exported(tmp_path, "keras3-cnn", positive=True)
    assert node_counts(raw)["Transpose"] == 4 and bn_derived_nodes(raw) == 2
    folded, report = check(model, raw, images)
    counts = node_counts(folded)
    assert bn_derived_nodes(folded) == 0 and "Cast" not in counts and "Dropout" not in counts
    assert counts["Transpose"] == 1  # the NHWC input's; the round trips around MaxPool are gone
    assert len(report["folded"]) == 1 and report["folded"][0].direction == "forward"
    assert "MatMul" in report["folded"][0].into


def test_keras_cnn_seed_negative_gamma_keeps_the_bn_before_maxpool(tmp_path, images):
    model, raw = exported(tmp_path, "keras3-cnn", positive=False)
    folded, report = check(model, raw, images)
    assert bn_derived_nodes(folded) == 2 and report["folded"] == []
    assert "<= 0" in report["kept"][0].reason and "MaxPool" in report["kept"][0].reason
