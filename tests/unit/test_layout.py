"""The house: one import root, arrows that point down the layers, no import cycles, small modules, one YAML
reader; the built wheel installs `compactlm` and nothing else (scripts/house.py measures the same)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("house", REPO / "scripts" / "house.py")
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)
MODULES = house.modules()


def test_imports_point_down_the_layers_only():
    assert house.upward(MODULES) == []


def test_there_are_no_import_cycles_even_through_lazy_imports():
    assert house.cycles(house.graph(MODULES)) == []


def test_nothing_imports_compress_engines_bench_or_serve_as_a_top_level_name():
    paths = [*MODULES.values(), *REPO.joinpath("tests").rglob("*.py"), *REPO.joinpath("scripts").rglob("*.py")]
    assert house.bare_imports(paths) == []


def test_modules_stay_small():
    assert [(n, m) for n, m in house.sizes(MODULES) if n > 500] == []


def test_yaml_is_parsed_in_one_place():
    assert house.yaml_readers(MODULES) == ["compactlm.core.config"]


def test_the_package_list_names_every_folder_that_holds_modules():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert listed == found


@pytest.mark.slow
def test_the_wheel_installs_one_import_root_with_every_module():
    top, files = house.wheel_names()
    assert {name for name in top if not name.endswith(".dist-info")} == {"compactlm"}
    for generic in house.GENERIC:
        assert generic not in top  # `import compress` etc. fails after `pip install compactlm`
    expected = {
        name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for name, path in MODULES.items()
    }
    assert expected <= files, sorted(expected - files)[:5]
    assert "compactlm/serve/triton_repo_models/tensorrt_llm_bls.py" in files  # copied into Triton repositories
