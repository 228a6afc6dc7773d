"""The pack imports the way ComfyUI imports it, and the engine never imports ComfyUI."""

import importlib.util
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pack_imports_as_a_package_under_any_folder_name():
    spec = importlib.util.spec_from_file_location(
        "ComfyUI_Bonsai_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) <= set(module.NODE_CLASS_MAPPINGS)
        assert all(name.startswith("Bonsai") for name in module.NODE_CLASS_MAPPINGS)
    finally:
        sys.modules.pop(spec.name, None)


def test_engine_never_imports_comfyui():
    forbidden = re.compile(r"^\s*(from|import)\s+(comfy|folder_paths|server|nodes|execution|latent_preview)\b", re.M)
    offenders = [str(p) for p in (ROOT / "bonsai_core").rglob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []


def test_bonsai_error_family_is_one_tree():
    import bonsai_core
    for name in ("BonsaiCheckpointError", "BonsaiRequestError", "BonsaiDeviceError", "BonsaiMemoryError",
                 "BonsaiCancelledError"):
        assert issubclass(getattr(bonsai_core, name), bonsai_core.BonsaiError)
