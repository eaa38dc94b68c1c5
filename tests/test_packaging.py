"""The distribution: the wheel carries ``conf/`` and ``lrl-train`` runs from it in any directory; the library
(``import lrlightning``, the callback, factorize, save/load) loads neither Hydra nor matplotlib."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP_ONLY = {"hydra", "omegaconf", "matplotlib"}


def fresh_interpreter(code: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def loaded_after(setup: str, code: str) -> set[str]:
    """Top-level packages that ``code`` imports in a fresh interpreter after ``setup`` ran."""
    probe = (f"import sys\n{setup}\nbefore = set(sys.modules)\n{code}\n"
             "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    return set(fresh_interpreter(probe).stdout.split())


@pytest.mark.slow  # fresh interpreters
def test_the_library_loads_no_app_dependency():
    export = loaded_after("", "import lrlightning\nfrom lrlightning import factorize, load_factorized, save_factorized")
    assert "torch" in export and not export & (APP_ONLY | {"lightning", "torchmetrics"})
    callback = loaded_after("import lightning.pytorch", "from lrlightning import LowRankProjection, factorize")
    assert "lrlightning" in callback and not callback & APP_ONLY


@pytest.mark.slow  # builds and installs a wheel, then trains in a subprocess
def test_the_wheel_ships_conf_and_lrl_train_runs_outside_the_checkout(tmp_path, tiny_train):
    pytest.importorskip("setuptools", minversion="70.1", reason="building a wheel without isolation needs setuptools"
                        " >= 70.1 in the environment (torch >= 2.6 requires it)")
    source = tmp_path / "source"
    shutil.copytree(REPO / "lrlightning", source / "lrlightning", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", source / "conf")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("lrlightning-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("lrlightning/app/conf/")}
    assert shipped == {f"lrlightning/app/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(site / "bin" / "lrl-train"), *tiny_train, "hydra.run.dir=run"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert (summary["method"], summary["layers_compressed"]) == ("lowrank_projection", 2)
    assert f"path: {site / 'lrlightning' / 'app' / 'conf'}\n" in (elsewhere / "run" / ".hydra" / "hydra.yaml").read_text()
