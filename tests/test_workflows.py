"""The example workflows, checked without ComfyUI: every file parses, names only node types that
exist (ours, or the few core nodes below), has consistent links, and every widget value fits its
input. UI files and their API twins describe the same graph. (With COMFYUI_PATH set,
test_real_comfyui.py runs them all in a real ComfyUI.)"""

import json
import sys
from pathlib import Path

import pytest

from tests import comfy_fixtures, comfy_stub

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# The core nodes the workflows use, as ComfyUI declares them (v0.3.64 and the 2026 build agree).
CORE = {
    "SaveImage": ({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}, ()),
    "ImageScaleBy": ({"image": ("IMAGE", {}),
                      "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
                      "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0})}, ("IMAGE",)),
    "UpscaleModelLoader": ({"model_name": ([comfy_fixtures.UPSCALER], {})}, ("UPSCALE_MODEL",)),
    "ImageUpscaleWithModel": ({"upscale_model": ("UPSCALE_MODEL", {}), "image": ("IMAGE", {})}, ("IMAGE",)),
    # the native workflows' core nodes (ComfyUI 0.33.0; the klein ones are absent from 0.3.64)
    "CLIPLoader": ({"clip_name": ([comfy_fixtures.QWEN_TE, comfy_fixtures.CLIP_L], {}),
                    "type": (["stable_diffusion", "flux2"], {}), "device": (["default", "cpu"], {})}, ("CLIP",)),
    "VAELoader": ({"vae_name": ([comfy_fixtures.FLUX2_VAE, comfy_fixtures.SD_VAE], {})}, ("VAE",)),
    "CLIPTextEncode": ({"text": ("STRING", {}), "clip": ("CLIP", {})}, ("CONDITIONING",)),
    "ConditioningZeroOut": ({"conditioning": ("CONDITIONING", {})}, ("CONDITIONING",)),
    "CFGGuider": ({"model": ("MODEL", {}), "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                   "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0})}, ("GUIDER",)),
    "Flux2Scheduler": ({"steps": ("INT", {"min": 1, "max": 4096}), "width": ("INT", {"min": 16, "max": 16384}),
                        "height": ("INT", {"min": 16, "max": 16384})}, ("SIGMAS",)),
    "KSamplerSelect": ({"sampler_name": (["euler", "dpmpp_2m"], {})}, ("SAMPLER",)),
    "RandomNoise": ({"noise_seed": ("INT", {"min": 0, "max": 2**64 - 1, "control_after_generate": True})}, ("NOISE",)),
    "EmptyFlux2LatentImage": ({"width": ("INT", {"min": 16, "max": 16384}), "height": ("INT", {"min": 16, "max": 16384}),
                               "batch_size": ("INT", {"min": 1, "max": 4096})}, ("LATENT",)),
    "SamplerCustomAdvanced": ({"noise": ("NOISE", {}), "guider": ("GUIDER", {}), "sampler": ("SAMPLER", {}),
                               "sigmas": ("SIGMAS", {}), "latent_image": ("LATENT", {})}, ("LATENT", "LATENT")),
    "VAEDecode": ({"samples": ("LATENT", {}), "vae": ("VAE", {})}, ("IMAGE",)),
    "EmptyLatentImage": ({"width": ("INT", {"min": 16, "max": 16384}), "height": ("INT", {"min": 16, "max": 16384}),
                          "batch_size": ("INT", {"min": 1, "max": 4096})}, ("LATENT",)),
    "KSampler": ({"model": ("MODEL", {}), "seed": ("INT", {"min": 0, "max": 2**64 - 1, "control_after_generate": True}),
                  "steps": ("INT", {"min": 1, "max": 10000}), "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                  "sampler_name": (["euler", "dpmpp_2m"], {}), "scheduler": (["simple", "karras", "normal"], {}),
                  "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}), "latent_image": ("LATENT", {}),
                  "denoise": ("FLOAT", {"min": 0.0, "max": 1.0})}, ("LATENT",)),
    "LoraLoaderModelOnly": ({"model": ("MODEL", {}), "lora_name": ([comfy_fixtures.KLEIN_LORA], {}),
                             "strength_model": ("FLOAT", {"min": -100.0, "max": 100.0})}, ("MODEL",)),
}
# model lists are files on the user's disk: the workflows name the models the real-ComfyUI test makes
LISTED = {("BonsaiLoader", "model"): ["bonsai-shapes", comfy_fixtures.SD_MODEL, comfy_fixtures.KLEIN_MODEL],
          ("BonsaiDiffusionModelLoader", "model_name"): [comfy_fixtures.KLEIN_GGUF, comfy_fixtures.SD15_MODEL]}
MODEL_DIRS = {"BonsaiLoader": ("bonsai",), "UpscaleModelLoader": ("upscale_models",),
              "BonsaiDiffusionModelLoader": ("diffusion_models", "bonsai"), "CLIPLoader": ("text_encoders",),
              "VAELoader": ("vae",), "LoraLoaderModelOnly": ("loras",)}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """node type -> (inputs {name: (type, options)} in declaration order, output types)."""
    mods = comfy_stub.make_modules(tmp_path_factory.mktemp("models"))
    mods.pop("_log")
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        pack = comfy_stub.load_pack("ComfyUI_Bonsai_workflows")
        out = dict(CORE)
        for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
            spec = cls.INPUT_TYPES()
            inputs = {**spec["required"], **spec.get("optional", {})}
            for (node, name), values in LISTED.items():
                if node == node_id:
                    inputs[name] = (values, inputs[name][1])
            out[node_id] = (inputs, cls.RETURN_TYPES)
        return out
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def kind(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def check_value(where: str, spec, value) -> None:
    t, opts = spec
    if isinstance(t, list):
        assert value in t, f"{where}: {value!r} is not one of {t}"
    elif t == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", -2**63) <= value <= opts.get("max", 2**64), f"{where}: {value} out of range"
    elif t == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", -1e300) <= value <= opts.get("max", 1e300), f"{where}: {value} out of range"
    elif t == "STRING":
        assert isinstance(value, str), where
    elif t == "BOOLEAN":
        assert isinstance(value, bool), where


def test_the_workflows_folder_is_the_only_example_folder_and_every_file_has_its_twin_and_thumbnail():
    for other in ("example_workflows", "example", "examples", "workflow"):
        assert not (ROOT / other).exists(), other  # ComfyUI serves only the first of these it finds
    assert len(UI_FILES) == 10 and [p.name for p in UI_FILES] == [p.name for p in API_FILES]
    for p in UI_FILES:
        jpg = p.with_suffix(".jpg")
        assert jpg.is_file() and jpg.read_bytes()[:3] == b"\xff\xd8\xff", jpg


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_uses_known_nodes_with_fitting_values_and_valid_links(path, specs):
    wf = json.loads(path.read_text())
    for node_id, node in wf.items():
        ct = node["class_type"]
        assert ct in specs, f"{path.name}: unknown node type {ct}"
        inputs, _ = specs[ct]
        assert set(node["inputs"]) <= set(inputs), f"{path.name} node {node_id}: unknown inputs"
        for name, spec in inputs.items():
            where = f"{path.name} node {node_id} ({ct}).{name}"
            if name not in node["inputs"]:
                assert ct.startswith("Bonsai") and name in {"path", "font_path", "pipe"}, f"{where} missing"
                continue
            value = node["inputs"][name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                assert src in wf, f"{where}: links to missing node {src}"
                outputs = specs[wf[src]["class_type"]][1]
                assert 0 <= slot < len(outputs), f"{where}: no output {slot}"
                assert outputs[slot] == kind(spec), f"{where}: gets {outputs[slot]}, wants {kind(spec)}"
            else:
                assert kind(spec) in WIDGETS | {"COMBO"}, f"{where}: a {kind(spec)} input needs a link"
                check_value(where, spec, value)


def widget_names(inputs) -> list[str]:
    names = []
    for name, spec in inputs.items():
        if kind(spec) in WIDGETS | {"COMBO"}:
            names.append(name)
            if spec[1].get("control_after_generate"):
                names.append(name + ":control")
    return names


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_links_are_consistent_and_it_is_its_api_twin(path, specs):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / path.name).read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links, default=0)
    assert ui["last_node_id"] >= max(nodes)
    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        assert lid in nodes[src]["outputs"][src_slot]["links"], f"{path.name} link {lid}: not at its origin"
        assert nodes[src]["outputs"][src_slot]["type"] == ltype
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, f"{path.name} link {lid}: not at its target"
        assert nodes[dst]["inputs"][dst_slot]["type"] == ltype
    for n in nodes.values():
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in links, f"{path.name} node {n['id']}: dangling link"
        for o in n["outputs"]:
            assert all(lid in links for lid in o["links"]), f"{path.name} node {n['id']}: dangling output"
    # widgets fit their inputs, and the graph is the API twin's
    assert sorted(int(k) for k in api) == sorted(nodes)
    for nid, n in nodes.items():
        twin = api[str(nid)]
        assert n["type"] == twin["class_type"], f"{path.name} node {nid}"
        inputs, outputs = specs[n["type"]]
        assert [o["type"] for o in n["outputs"]] == list(outputs)
        names = widget_names(inputs)
        assert len(n["widgets_values"]) == len(names), f"{path.name} node {nid}: {len(n['widgets_values'])} widgets"
        for name, value in zip(names, n["widgets_values"]):
            if name.endswith(":control"):
                assert value in ("fixed", "increment", "decrement", "randomize"), f"{path.name} node {nid}"
                continue
            linked = any(i.get("widget", {}).get("name") == name and i["link"] for i in n["inputs"])
            check_value(f"{path.name} node {nid}.{name}", inputs[name], value)
            if not linked and name in twin["inputs"]:
                assert value == twin["inputs"][name], f"{path.name} node {nid}.{name}: UI {value!r} vs API"
        for i in n["inputs"]:
            if i["link"]:
                _, src, slot, _, _, _ = links[i["link"]]
                assert twin["inputs"][i["name"]] == [str(src), slot], f"{path.name} node {nid}.{i['name']}"
        if n["type"] in MODEL_DIRS:  # the missing-models dialog: which file, where from, which folder
            (model,) = n["properties"]["models"]
            assert model["name"] == n["widgets_values"][0] or n["type"] == "UpscaleModelLoader"
            assert model["url"].startswith("https://") and model["directory"] in MODEL_DIRS[n["type"]]
