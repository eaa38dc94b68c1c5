"""The manual's code runs as written: the examples of the README, docs/guide.md and docs/deploy.md and the recipe
of docs/adding-a-scheme.md, each in an empty folder; its tables and lists match the code and conf/."""
import re
from pathlib import Path

import pytest

from lrlightning.schemes import SCHEMES

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.fixture
def empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow  # trains for about a minute
def test_readme_first_example_trains_factorizes_saves_and_loads(empty_folder):
    namespace = {}
    exec(compile(python_blocks(ROOT / "README.md")[0], "README.md", "exec"), namespace)
    assert (empty_folder / "small.pt").is_file()
    projection, loaded = namespace["projection"], namespace["loaded"]
    assert projection.num_projections > 0 and projection.plans
    kinds = {type(module).__name__ for module in loaded.modules()}
    assert "LowRankConv2d" in kinds  # the loaded model is the factorized one, not the dense skeleton


def test_readme_budget_example_builds_its_callback():
    namespace = {}
    exec(compile(python_blocks(ROOT / "README.md")[1], "README.md", "exec"), namespace)
    options = namespace["projection"].options
    assert options.rank.metric == "latency" and options.rank.input_shape == (3, 224, 224)
    assert options.scheme.options() == {"hooi_iters": 1} and options.objective.batches == 4
    assert options.layers.exclude == ("fc",)


def test_guide_distillation_example_blends_the_teachers_logits_and_hides_the_teacher():
    import torch
    from torch import nn

    from lrlightning import LowRankOptions, distillation_loss, plan_layers

    namespace = {}
    [block] = [b for b in python_blocks(ROOT / "docs" / "guide.md") if "DistilledClassifier" in b]
    exec(compile(block, "guide.md", "exec"), namespace)
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    student, dense = make(), make()
    student(x), dense(x)
    module = namespace["DistilledClassifier"](student, dense)
    loss = module.training_step((x, y), 0)
    logits = student(x)
    expected = 0.5 * nn.functional.cross_entropy(logits, y) + 0.5 * distillation_loss(logits, dense(x), 4.0)
    torch.testing.assert_close(loss, expected)
    assert [p.name for p in plan_layers(module, LowRankOptions("svd", 2))[0]] == ["backbone.2"]  # not the teacher


def test_deploy_example_writes_checked_fp32_and_int8_files(empty_folder):
    pytest.importorskip("onnxruntime", reason="needs the `onnx` extra")
    pytest.importorskip("onnxscript", reason="needs the `onnx` extra")
    [block] = [b for b in python_blocks(ROOT / "docs" / "deploy.md") if "quantize_int8" in b]
    namespace = {}
    exec(compile(block, "deploy.md", "exec"), namespace)
    fp32, int8, logits = namespace["fp32"], namespace["int8"], namespace["logits"]
    assert (empty_folder / "small.onnx").is_file() and (empty_folder / "small.int8.onnx").is_file()
    assert fp32.max_abs_diff < 1e-4 and int8.size_bytes < fp32.size_bytes and int8.quantized
    assert not set(int8.quantized) & set(int8.float)
    assert logits.shape == (8, 10)


def test_adding_a_scheme_recipe_runs_and_registers_an_option(empty_folder):
    namespace = {}
    try:
        exec(compile(python_blocks(ROOT / "docs" / "adding-a-scheme.md")[0], "adding-a-scheme.md", "exec"), namespace)
        scheme = namespace["BalancedSVD"](power=1.0)
        assert SCHEMES["balanced_svd"] is namespace["BalancedSVD"]
        assert namespace["callback"].options.scheme == scheme and scheme.options() == {"power": 1.0}
        assert (empty_folder / "balanced.pt").is_file()
        with pytest.raises(ValueError, match=r"`power` of BalancedSVD must be a number in \[0, 1\], got 2"):
            namespace["BalancedSVD"](power=2)
    finally:
        SCHEMES.pop("balanced_svd", None)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_options_table_lists_every_callback_argument_with_its_default():
    import inspect

    from lrlightning import LowRankProjection

    options = readme_section("Options").split("Rank rules", 1)[0]
    rows = re.findall(r"^\| `([^|]+?)` \| ([^|]*?) \|", options, re.M)
    table = {}
    for names, defaults in rows:
        for name, default in zip(names.split("`, `"), defaults.split(", ")):
            table[name] = default.strip().strip("`")
    parameters = inspect.signature(LowRankProjection).parameters
    assert list(table) == list(parameters)
    for name, parameter in parameters.items():
        default = parameter.default
        if default is None or isinstance(default, (bool, int, float, str)):
            written = f'"{default}"' if isinstance(default, str) else str(default)
            assert table[name] == written or (default is None and name in ("layers", "solver")), name


def test_app_config_group_lists_match_the_conf_folders():
    text = " ".join((ROOT / "docs" / "app.md").read_text().split())
    listed = text.split("Config groups: ", 1)[1].split(". ", 1)[0]
    conf = ROOT / "conf"
    for group in ("model", "data", "lowrank", "method", "point", "trainer", "logger", "deploy", "hydra/launcher"):
        found = re.search(rf"`{group}/` \(([^()]*(?:\([^()]*\)[^()]*)*)\)", listed)
        assert found, f"docs/app.md's config groups do not list {group}/"
        words = set(re.findall(r"[a-z][a-z0-9_.]*", found.group(1)))
        files = {path.stem for path in (conf / group).glob("*.yaml")}
        variants = {f"lowrank_projection{name}" for name in re.findall(r"`(_[a-z0-9]+)`", found.group(1))}
        missing = files - words - variants
        assert not missing, f"docs/app.md's `{group}/` list misses {sorted(missing)}"


def test_guide_plain_loop_example_projects_on_its_schedule_and_factorizes_exactly(empty_folder):
    import torch

    namespace = {}
    [block] = [b for b in python_blocks(ROOT / "docs" / "guide.md") if "projector.after_step" in b]
    exec(compile(block, "guide.md", "exec"), namespace)
    projector, model, small = namespace["projector"], namespace["model"], namespace["small"]
    assert [entry["step"] for entry in projector.history] == [4, 8]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)
