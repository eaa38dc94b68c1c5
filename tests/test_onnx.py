import warnings

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the `onnx` extra")
pytest.importorskip("onnxscript", reason="needs the `onnx` extra")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from lrlightning import TiledSVD, factorize, project_  # noqa: E402
from lrlightning.zoo import build_backbone  # noqa: E402

from helpers import MIXED_MODELS  # noqa: E402


def exported(module, x, path):
    """``module`` exported to ONNX at ``path`` (dynamo exporter) on the example ``x``, loaded and checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("scheme, rank", [("tucker2", 0.5), (TiledSVD(tile_shape=(8, 12)), 2)], ids=["tucker2", "tiled_svd"])
def test_factorized_model_exports_to_onnx_with_same_outputs(tmp_path, scheme, rank):
    torch.manual_seed(0)
    dense = build_backbone("resnet20", num_classes=10, in_channels=1, width=8).eval()
    project_(dense, scheme, rank)
    small = factorize(dense, scheme, rank).eval()
    x = torch.randn(2, 1, 16, 16)
    model = exported(small, x, tmp_path / "small.onnx")
    (logits,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        assert abs(torch.from_numpy(logits) - dense(x)).max().item() < 1e-4


def test_factorized_resnet18_runs_in_onnxruntime_with_the_projected_dense_logits(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs the `onnx` extra")
    torch.manual_seed(0)
    dense = build_backbone("resnet18", num_classes=10, in_channels=3, width=8).eval()
    project_(dense, "tucker2", 0.5)
    small = factorize(dense, "tucker2", 0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert abs(torch.from_numpy(logits) - dense(x)).max().item() < 1e-4


@pytest.mark.parametrize("dims", ["1d", "2d", "3d"])
def test_grouped_depthwise_pointwise_conv1d_and_conv3d_layers_export_to_onnx(tmp_path, dims):
    torch.manual_seed(1)
    build, shape = MIXED_MODELS[dims]
    dense = build().eval()
    project_(dense, "svd", 0.5)
    small = factorize(dense, "svd", 0.5).eval()
    x = torch.randn(2, *shape)
    model = exported(small, x, tmp_path / "small.onnx")
    groups = [attribute.i for node in model.graph.node if node.op_type == "Conv" for attribute in node.attribute
              if attribute.name == "group"]
    assert max(groups) > 1
    (out,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected = dense(x)
    assert abs(torch.from_numpy(out) - expected).max().item() <= 1e-4 * expected.abs().max().item()
