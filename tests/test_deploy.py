"""ONNX files that ship (BatchNorm folded, dynamic batch, checked), their int8 quantization, and latency tables
timed in ONNX Runtime."""
import json
import sys

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="needs the `onnx` extra")
pytest.importorskip("onnxscript", reason="needs the `onnx` extra")
onnxruntime = pytest.importorskip("onnxruntime", reason="needs the `onnx` extra")

from lrlightning import Budget, Latency, LowRankOptions, factorize, project_  # noqa: E402
from lrlightning.deploy.int8 import layer_name, quantize_int8, weight_layers  # noqa: E402
from lrlightning.deploy.int8_config import Int8Config  # noqa: E402
from lrlightning.deploy.precision import (LayerPrecision, layer_alone, measure_precision, shapes_at_batch_one,  # noqa: E402
                                          weight_nodes)
from lrlightning.speed.cpu import int8_path  # noqa: E402
from lrlightning.speed.timing import Spread  # noqa: E402
from lrlightning.speed.latency import LatencyTable  # noqa: E402
from lrlightning.deploy.onnx import OnnxExportError, SessionModule, export_onnx, session  # noqa: E402
from lrlightning.plan import allocate_plan, plan_layers  # noqa: E402
from lrlightning.rules import rule_label, rule_record  # noqa: E402
from lrlightning.zoo import build_backbone  # noqa: E402


def settled(model, shape):
    """``model`` with BatchNorm statistics from two train-mode passes (not the identity), in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *shape) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def factorized_resnet():
    torch.manual_seed(0)
    dense = settled(build_backbone("resnet20", num_classes=10, in_channels=1, width=8), (1, 16, 16))
    project_(dense, "svd", 0.5)
    return dense, factorize(dense, "svd", 0.5).eval()


def test_export_folds_batchnorm_keeps_the_batch_dynamic_and_matches_pytorch(tmp_path, factorized_resnet):
    dense, small = factorized_resnet
    file = export_onnx(small, torch.randn(4, 1, 16, 16), tmp_path / "deep" / "small.onnx")
    graph = onnx.load(file.path).graph
    assert file.batchnorm_left == 0 and not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert file.size_bytes == (tmp_path / "deep" / "small.onnx").stat().st_size and file.batch_sizes == (4, 3)
    assert graph.input[0].name == "input" and graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert file.max_abs_diff < 1e-4
    runner = SessionModule(session(file.path))
    for batch in (1, 7):
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            expected = dense(x)  # the projected dense model: the factorized file computes the same function
        assert torch.allclose(torch.from_numpy(runner(x)), expected, atol=1e-4)
    assert small.training is False and dense.training is False


class DataDependent(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor's value: the exporter cannot trace it
            return x * 2
        return x


def test_a_model_the_exporter_cannot_take_names_the_failing_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), DataDependent()), nn.Flatten())
    with pytest.raises(OnnxExportError, match=r"ONNX cannot export Sequential: layer '1\.1' \(DataDependent\) "
                                              r"fails on its own") as caught:
        export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "bad.onnx")
    assert caught.value.layer == "1.1" and not (tmp_path / "bad.onnx").exists()


def test_an_export_whose_outputs_differ_from_pytorch_is_refused_and_removed(tmp_path, monkeypatch):
    real = SessionModule.__call__
    monkeypatch.setattr(SessionModule, "__call__", lambda self, x: real(self, x) + 0.01)
    with pytest.raises(OnnxExportError, match=r"does not match PyTorch at batch 2: max \|output diff\| 0\.01"):
        export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.randn(2, 1, 6, 6), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_example_that_is_not_a_batch_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"`example` must be a batch of inputs \(N, C, \*size\)"):
        export_onnx(nn.Conv2d(1, 2, 3), torch.randn(6), tmp_path / "m.onnx")


def test_a_missing_extra_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r"export_onnx needs the `onnx` extra, which is not installed \(missing: "
                                          r"onnxruntime\): pip install 'lrlightning\[onnx\]'"):
        export_onnx(nn.Conv2d(1, 2, 3), torch.randn(2, 1, 6, 6), "unused.onnx")
    with pytest.raises(ImportError, match="a latency table in ONNX Runtime needs the `onnx` extra"):
        LatencyTable("cpu", 2, backend="onnxruntime")


def test_int8_quantizes_every_weight_layer_shrinks_the_file_and_keeps_the_predictions(tmp_path, factorized_resnet):
    dense, small = factorized_resnet
    fp32 = export_onnx(small, torch.randn(4, 1, 16, 16), tmp_path / "small.onnx")
    calibration = [(torch.randn(16, 1, 16, 16) * 2 + 0.5, torch.zeros(16)) for _ in range(3)]
    int8 = quantize_int8(fp32.path, tmp_path / "small.int8.onnx", calibration, {"layers": "all"})
    weights = [n for n in onnx.load(fp32.path).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert int8.calibration_batches == 3 and int8.float == () and len(int8.quantized) == len(weights)
    assert "layer1.0.conv1.0" in int8.quantized  # named by the PyTorch module the node came from
    quantized, left = weight_layers(onnx.load(fp32.path))  # the float model: every weight layer left in float
    assert quantized == [] and sorted(left) == sorted(int8.quantized)
    assert int8.size_bytes < fp32.size_bytes
    model = onnx.load(int8.path)
    producers = {out: node for node in model.graph.node for out in node.output}
    stored = {init.name: init.data_type for init in model.graph.initializer}
    for node in model.graph.node:  # each weight is stored in int8 and dequantized at run time
        if node.op_type == "Conv":
            assert stored[producers[node.input[1]].input[0]] == onnx.TensorProto.INT8
    x = torch.randn(64, 1, 16, 16) * 2 + 0.5
    with torch.no_grad():
        expected = small(x)
    got = torch.from_numpy(SessionModule(session(int8.path))(x))
    correlation = torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1]
    assert 0.9 < correlation < 1.0  # 8-bit activations and weights: close to the float model, not exact


def thin_model():
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1), nn.Conv2d(4, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_int8_leaves_the_layers_measured_slower_in_float_and_says_why(tmp_path, monkeypatch):
    fp32 = export_onnx(thin_model(), torch.randn(4, 3, 12, 12), tmp_path / "m.onnx")
    timed = []

    def measured(model, config, batch_sizes):  # layers "2" and "3" (into and out of 4 channels) time slower
        timed.append((config.weight_range, config.layers, tuple(batch_sizes)))
        ratio = {"2": 1.4, "3": 1.1}
        return [LayerPrecision(node.name, {b: Spread.of([ratio.get(layer_name(node), 0.5)]) for b in batch_sizes})
                for node in weight_nodes(model)], {b: {"state": "measured"} for b in batch_sizes}

    monkeypatch.setattr("lrlightning.deploy.int8.measure_precision", measured)
    int8 = quantize_int8(fp32.path, tmp_path / "m.int8.onnx", [torch.randn(8, 3, 12, 12)], batch_sizes=(1, 128))
    assert timed == [("reduced" if int8_path() in ("avx2", "none") else "full", "measured", (1, 128))]
    assert (int8.quantized, int8.float) == (("0", "7"), ("2", "3"))
    assert int8.why_float == {"2": "measured slower in int8: int8 / float time 1.40x at batch 1, 1.40x at batch 128",
                              "3": "measured slower in int8: int8 / float time 1.10x at batch 1, 1.10x at batch 128"}
    assert int8.timing == {1: {"state": "measured"}, 128: {"state": "measured"}}
    kept = quantize_int8(fp32.path, tmp_path / "kept.int8.onnx", [torch.randn(8, 3, 12, 12)],
                         Int8Config(float_layers=("0",)))
    assert (kept.quantized, kept.float) == (("7",), ("0", "2", "3"))
    assert kept.why_float["0"] == "kept in float by Int8Config.float_layers"
    every = quantize_int8(fp32.path, tmp_path / "every.int8.onnx", [torch.randn(8, 3, 12, 12)], {"layers": "all"})
    assert (every.quantized, every.float, every.why_float, every.timing) == (("0", "2", "3", "7"), (), {}, {})
    assert len(timed) == 2  # "all" times nothing
    with pytest.raises(ValueError, match=r"`Int8Config.float_layers` names \['head'\], which are not weight layers "
                                         r"of the model; its weight layers: \['0', '2', '3', '7'\]"):
        quantize_int8(fp32.path, tmp_path / "x.onnx", [torch.randn(8, 3, 12, 12)], {"float_layers": ["head"]})
    with pytest.raises(ValueError, match=r"`batch_sizes` must be one or more ints >= 1, such as \(1, 32\), got "
                                         r"\(0,\)"):
        quantize_int8(fp32.path, tmp_path / "x.onnx", [torch.randn(8, 3, 12, 12)], batch_sizes=(0,))


def test_each_weight_layer_is_timed_alone_in_float_and_int8_at_every_batch_size_and_cached(tmp_path):
    import onnx

    fp32 = export_onnx(thin_model(), torch.randn(4, 3, 12, 12), tmp_path / "m.onnx")
    model = onnx.load(fp32.path)
    config = Int8Config(cache=str(tmp_path / "cache")).resolved()
    layers, facts = measure_precision(model, config, (1, 3))
    assert [layer.node for layer in layers] == [node.name for node in weight_nodes(model)] and len(layers) == 4
    for layer in layers:
        assert sorted(layer.ratios) == [1, 3] and all(s.median > 0 and s.rounds >= 7 for s in layer.ratios.values())
        assert layer.faster == (layer.ratio < 1.0) and "at batch 1" in layer.text()
    assert facts[1]["state"] == "measured" and facts[1]["measured"] == 8  # a float and an int8 form per layer
    cache = json.loads(next((tmp_path / "cache").glob("latency-onnxruntime-*.json")).read_text())
    assert sum("|int8 " in key for key in cache["entries"]) == 8  # 4 layers at 2 batch sizes
    again, facts = measure_precision(model, config, (1, 3))
    assert {s for f in facts.values() for s in [f["state"]]} <= {"cached", "stale"}
    if facts[1]["state"] == "cached":  # confirmed by re-timing the largest layer: nothing timed anew
        assert facts[1]["measured"] == 0 and [a.ratios[1] for a in again] == [b.ratios[1] for b in layers]


def test_a_layer_cut_out_alone_computes_what_it_does_in_the_model(tmp_path):
    import onnx

    model = thin_model()
    fp32 = export_onnx(model, torch.randn(4, 3, 12, 12), tmp_path / "m.onnx")
    graph = onnx.load(fp32.path)
    first = weight_nodes(graph)[0]
    alone = layer_alone(graph, first, shapes_at_batch_one(graph))
    x = torch.randn(5, 3, 12, 12)  # any batch size: the batch dimension stays free
    got = torch.from_numpy(SessionModule(session(alone.SerializeToString()))(x))
    with torch.no_grad():
        assert torch.allclose(got, model[0](x), atol=1e-5)


def test_the_weight_range_and_activation_type_reach_the_file(tmp_path):
    import onnx

    fp32 = export_onnx(thin_model(), torch.randn(4, 3, 12, 12), tmp_path / "m.onnx")
    stored = {}
    for weights, activations in (("full", "uint8"), ("reduced", "int8")):
        int8 = quantize_int8(fp32.path, tmp_path / f"{weights}.onnx", [torch.randn(8, 3, 12, 12)],
                             Int8Config(weights, activations, layers="all"))
        assert (int8.settings["weight_range"], int8.settings["activations"]) == (weights, activations)
        model = onnx.load(int8.path)
        values = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
        producers = {out: node for node in model.graph.node for out in node.output}
        conv = next(node for node in model.graph.node if node.op_type == "Conv")
        stored[weights] = int(abs(values[producers[conv.input[1]].input[0]].astype(int)).max())
        zero_points = [values[node.input[2]].dtype.name for node in model.graph.node if node.op_type == "QuantizeLinear"]
        assert zero_points and set(zero_points) == {activations}
    assert stored["full"] == 127 and stored["reduced"] <= 64  # 8-bit against 7-bit weights


def test_int8_needs_a_calibration_batch(tmp_path):
    fp32 = export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.randn(2, 1, 6, 6), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="`calibration` must yield at least one batch of inputs, got none"):
        quantize_int8(fp32.path, tmp_path / "m.int8.onnx", [])
    assert not (tmp_path / "m.int8.onnx").exists()


def test_an_onnxruntime_latency_table_times_layers_in_their_own_cache_file(tmp_path):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    candidates = {"svd:2": lambda: nn.Sequential(nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(2, 8, 1))}
    table = LatencyTable("cpu", 2, tmp_path, backend="onnxruntime")
    eager = LatencyTable("cpu", 2, tmp_path)
    assert table.key.startswith(f"onnxruntime {onnxruntime.__version__} cpu") and table.path != eager.path
    times = table.layer_times(conv, (8, 12, 12), candidates)
    assert times.dense.median > 0 and times.ratios["svd:2"].median > 0 and table.measured == 2
    again = LatencyTable("cpu", 2, tmp_path, backend="onnxruntime")
    assert again.layer_times(conv, (8, 12, 12), candidates) == times and again.measured == 0
    whole, inside = table.model_ms(nn.Sequential(conv, nn.ReLU()), (8, 12, 12), ["0"])
    assert whole > 0 and inside == {}  # ONNX Runtime runs the graph whole: no layer is timed inside it
    assert table.facts()["backend"] == "onnxruntime"


def test_latency_backends_are_checked():
    with pytest.raises(ValueError, match=r"`backend` must be one of \('eager', 'onnxruntime'\), got 'tensorrt'"):
        LatencyTable("cpu", 2, backend="tensorrt")
    with pytest.raises(ValueError, match=r"`backend`='onnxruntime' times on the CPU, got device 'meta'"):
        LatencyTable("meta", 2, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"`Latency.backend` must be one of \('eager', 'onnxruntime'\), got 'ort'"):
        Budget(2.0, metric="latency", input_shape=(3, 8, 8), latency=Latency(backend="ort"))
    with pytest.raises(ValueError, match=r"`Latency.device` must be None or 'cpu', got 'cuda'"):
        Budget(2.0, metric="latency", input_shape=(3, 8, 8), latency={"backend": "onnxruntime", "device": "cuda"})


def test_an_onnxruntime_budget_allocates_on_an_onnxruntime_table_and_says_so(mac_latency):
    model = build_backbone("resnet20", num_classes=10, in_channels=1, width=8).eval()
    rule = Budget(1.5, metric="latency", input_shape=(1, 16, 16), latency=Latency(backend="onnxruntime"))
    plans, _ = plan_layers(model, LowRankOptions("svd", rule), warn=False)
    [table] = mac_latency.made
    assert plans and (table.backend, str(table.device)) == ("onnxruntime", "cpu")
    assert rule_record(rule) == {"budget": 1.5, "metric": "latency", "backend": "onnxruntime"}
    assert rule_label(rule_record(rule)) == "budget=1.5x latency (onnxruntime)"
    assert rule_record(Budget(2.0)) == {"budget": 2.0, "metric": "params"}


def test_an_int8_latency_table_times_candidates_and_the_layer_left_dense_in_int8_against_fp32(tmp_path):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    candidates = {"svd:4": lambda: nn.Sequential(nn.Conv2d(16, 4, 3, padding=1), nn.Conv2d(4, 16, 1))}
    table = LatencyTable("cpu", 2, tmp_path, backend="onnxruntime", precision="int8")
    times = table.layer_times(conv, (16, 12, 12), candidates)
    fp32 = LatencyTable("cpu", 2, tmp_path, backend="onnxruntime")
    assert table.path == fp32.path  # one table per CPU and runtime: int8 entries carry their settings in the label
    assert set(times.ratios) == {"svd:4"} and times.dense_int8.median > 0 and table.measured == 3
    label = table.int8_label()
    assert label.startswith(("int8 reduced uint8", "int8 full uint8")) and label.endswith("in-chain")
    cached = json.loads(table.path.read_text())["entries"]
    assert sum(key.endswith(f"|svd:4 {label}") or key.endswith(f"|dense {label}") for key in cached) == 2
    assert fp32.layer_times(conv, (16, 12, 12), {}).dense == times.dense and fp32.measured == 0  # shared fp32 time
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    whole, _ = table.model_ms(model, (16, 12, 12))
    whole_int8, _ = table.model_ms(model, (16, 12, 12), int8=True)
    assert whole > 0 and whole_int8 > 0 and table.facts()["precision"] == "int8"
    assert any(key.startswith("model") and key.endswith(f"|{label}") for key in json.loads(
        table.path.read_text())["entries"])
    with pytest.raises(ValueError, match=r"`precision` must be 'fp32', or 'int8' with backend='onnxruntime', got "
                                         r"'int8' with backend='eager'"):
        LatencyTable("cpu", 2, tmp_path, precision="int8")


def test_an_int8_latency_budget_is_allocated_on_int8_timings_and_checked_on_the_int8_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    latency = Latency(batch_sizes=(8,), backend="onnxruntime", precision="int8", cache=str(tmp_path))
    rule = Budget(2.0, metric="latency", input_shape=(3, 16, 16), latency=latency, out_of_reach="closest")
    assert rule_record(rule) == {"budget": 2.0, "metric": "latency", "backend": "onnxruntime", "precision": "int8"}
    assert rule_label(rule_record(rule)) == "budget=2x latency (onnxruntime int8)"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a noisy machine may measure it short: "closest" keeps the best measured
        plans, _, allocation = allocate_plan(model, LowRankOptions("svd", rule), warn=False)
    assert plans and allocation.table["precision"] == "int8" and allocation.check is not None
    entries = json.loads(next(tmp_path.glob("latency-onnxruntime-*.json")).read_text())["entries"]
    [reference] = [key for key in entries if key.startswith("model") and "|" not in key]
    assert allocation.dense == entries[reference]["ms"]["median"]  # the budget divides the fp32 model's time
    assert any(key.startswith(reference + "|int8") for key in entries)  # what is left runs in int8 too
    left = [key for key in entries if "|dense int8" in key]
    assert len(left) == 1 and entries[left[0]]["ratio"]["median"] > 0  # the two 64-channel convs share one entry
    fp32_ms, int8_ratio = entries[left[0].split("|")[0]]["ms"]["median"], entries[left[0]]["ratio"]["median"]
    for name, (dense_ms, allocated_ms) in allocation.costs.items():  # a layer left dense costs its int8 time
        assert dense_ms == pytest.approx(fp32_ms * int8_ratio) and allocated_ms <= dense_ms
    assert allocation.check.measured.median > 1.0  # int8 and low rank together: faster than dense fp32
    with pytest.raises(ValueError, match=r"`Latency.precision`='int8' is timed in ONNX Runtime; `Latency.backend` "
                                         r"must be 'onnxruntime', got 'eager'"):
        Latency(precision="int8")
    with pytest.raises(ValueError, match=r"`Latency.precision` must be one of \('fp32', 'int8'\), got 'fp16'"):
        Latency(backend="onnxruntime", precision="fp16")
