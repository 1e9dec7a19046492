"""The layering and the packaging: the library and its trainer import nothing of the
experiment harness, every declared dependency has one pin, and the wheel installed in a
fresh virtual environment trains from outside the checkout with only what it declares."""

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bioflax"
# What only the experiment harness may use.
HARNESS_ONLY = ("tensorflow", "tensorflow_datasets", "tensorboard", "ml_collections",
                "matplotlib", "bioflax.experiment")
# The entry points that run the harness under an established name, outside the library.
ENTRY_POINTS = {PACKAGE / "launch.py"}


def _library_modules() -> list[pathlib.Path]:
    return sorted(path for path in PACKAGE.rglob("*.py")
                  if "experiment" not in path.relative_to(PACKAGE).parts
                  and path not in ENTRY_POINTS)


def _imported_names(path: pathlib.Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports
    inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_harness(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HARNESS_ONLY)


def test_no_library_module_imports_the_harness_even_lazily():
    modules = _library_modules()
    assert PACKAGE / "trainer" / "loop.py" in modules and PACKAGE / "rules.py" in modules
    offending = {str(path.relative_to(REPO)): sorted(filter(_is_harness, _imported_names(path)))
                 for path in modules}
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_trainer_imports_no_learning_rule_module():
    """The trainer knows nothing of feedback rules: of bioflax it imports itself and the
    neutral modules (errors, several processes, the targets a rule may read)."""
    trainer = sorted((PACKAGE / "trainer").rglob("*.py"))
    neutral = {"bioflax", "bioflax.errors", "bioflax.distributed", "bioflax.targets"}
    imported = {name for path in trainer for name in _imported_names(path)
                if name == "bioflax" or name.startswith("bioflax.")}
    allowed = {name for name in imported if name.startswith("bioflax.trainer")
               or name in neutral or name.rsplit(".", 1)[0] in neutral - {"bioflax"}}
    assert "bioflax.targets" in imported
    assert sorted(imported - allowed) == []


def test_importing_the_library_and_trainer_loads_no_harness_module():
    code = ("import json, sys\nimport bioflax, bioflax.trainer, bioflax.alignment, bioflax.zoo\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                       capture_output=True, text=True).stdout)
    assert "bioflax.trainer.loop" in loaded and "flax" in loaded
    assert [name for name in loaded if _is_harness(name)] == []


_LIBRARY_ONLY_TRAINING = """
import json, sys
import numpy as np, optax
from flax import linen as nn
import bioflax
from bioflax import alignment, losses
from bioflax.trainer import (ArrayData, ClassificationMetrics, EarlyStopping,
                             ModelCheckpoint, Task, Trainer)

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))

x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
data = ArrayData(x, (x[:, 0] > 0).astype(np.int32))
task = Task(bioflax.convert(MLP(), "kp"), losses.softmax_cross_entropy, optax.sgd(0.1),
            ClassificationMetrics, step_metrics=[alignment.Alignment(2)])
trainer = Trainer(max_epochs=2, log_every_steps=2, progress_bar=False,
                  callbacks=[EarlyStopping("val/loss"), ModelCheckpoint(sys.argv[1])])
result = trainer.fit(task, data, data, batch_size=16)
assert len(result.history) == 2 and "val/accuracy" in result.history[-1]
print(json.dumps(sorted(sys.modules)))
"""


def test_training_with_the_library_alone_loads_no_harness_module(tmp_path):
    """fit, evaluation, checkpoints, early stopping, alignment and the progress report run
    without TensorFlow, TensorBoard or the configs (a plain ``pip install .``)."""
    loaded = json.loads(subprocess.run(  # the last line, after the console's epoch lines
        [sys.executable, "-c", _LIBRARY_ONLY_TRAINING, str(tmp_path / "checkpoints")],
        cwd=REPO, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    assert "orbax.checkpoint" in loaded and "clu.metrics" in loaded
    assert [name for name in loaded if _is_harness(name)] == []


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_declared_dependency_has_exactly_one_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [_name(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [_name(r) for r in extra]
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text()
            .splitlines()]
    pinned = [_name(pin) for pin in pins if pin]
    assert all("==" in pin for pin in pins if pin)
    assert len(pinned) == len(set(pinned)), "a package is pinned twice"
    assert sorted(set(declared) - set(pinned)) == []
    # jaxlib: jax's own dependency, pinned to jax's version.
    assert sorted(set(pinned) - set(declared)) == ["jaxlib"]


# Run inside the fresh environment: train as the bioflax-train script does, then list the
# distributions that provided a module, and those bioflax[experiment] requires.
_PROBE = """
import atexit, json, sys
import importlib.metadata as md
from packaging.requirements import Requirement

def closure(name, extras, seen):
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or [""]):
            closure(req.name, req.extras, seen)

def report():
    providers = md.packages_distributions()
    used = {dist.lower().replace("_", "-") for module in list(sys.modules)
            for dist in providers.get(module.split(".")[0], [])}
    declared = set()
    closure("bioflax", {"experiment"}, declared)
    import bioflax
    with open(OUT, "w") as f:
        json.dump({"used": sorted(used), "declared": sorted(declared),
                   "bioflax": bioflax.__file__}, f)

OUT = sys.argv[1]
atexit.register(report)
sys.argv = ["bioflax-train"] + sys.argv[2:]
from bioflax.experiment.main import run
run()
"""


@pytest.mark.e2e
def test_the_wheel_trains_from_outside_the_checkout_with_what_it_declares(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "bioflax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("bioflax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # The dependencies come from this environment (no download), after the venv's own.
    purelib = pathlib.Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert (venv / "bin" / "bioflax-train").exists()

    run_dir, found = tmp_path / "elsewhere", tmp_path / "found.json"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [str(python), "-c", _PROBE, str(found), "--config=kp_mnist.py",
         f"--workdir={tmp_path / 'run'}", "--config.training.fast_dev_run=2"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 2" in result.stderr
    probe = json.loads(found.read_text())
    assert probe["bioflax"].startswith(str(venv))
    # flax.nnx imports IPython (and its traitlets) when it is installed, as the [dev] extra
    # installs it for the notebook test; without it flax runs as well.
    optional = {"ipython", "traitlets"}
    undeclared = sorted(set(probe["used"]) - set(probe["declared"]) - {"bioflax"} - optional)
    assert undeclared == [], f"imported but not declared by bioflax[experiment]: {undeclared}"
