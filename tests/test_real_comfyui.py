"""The pack inside a real ComfyUI, on the CPU, over its HTTP API and websocket.

Skipped unless ``COMFYUI_PATH`` names a ComfyUI checkout. ``COMFYUI_PYTHON`` is the interpreter
that has ComfyUI's requirements and this pack's (default: the one running pytest). The test
copies the pack into a fresh base directory's ``custom_nodes/``, fills ``models/`` with the tiny
models the workflows name (tests/comfy_fixtures.py), starts ``main.py --cpu`` on 127.0.0.1 and:

* checks the pack imported (no IMPORT FAILED), its nodes, help pages and templates are served;
* runs every API workflow in workflows/api/, checks the images written and counts the
  progress messages and preview frames on the websocket;
* sends /interrupt during a long sampling run and checks that it stops within one step;
* sends bad requests (unknown model, size 0, 100k characters) that must fail the prompt and
  leave the server answering.

``BONSAI_COMFY_REPORT=<file.json>`` writes what was measured (times, counts, latency).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
PACK = "ComfyUI-Bonsai"
REPORT: dict = {"workflows": {}}


# ----------------------------------------------------------------------------- a tiny websocket client
class Socket:
    """A websocket client (RFC 6455) that reads text and binary frames into a list, on a thread.
    ComfyUI's /ws only talks to us; we send nothing after the handshake."""

    def __init__(self, port: int, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.sock.settimeout(None)
        self.messages: list[tuple[float, object]] = []  # (time, dict for text | ("binary", nbytes))
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _read(self) -> None:
        try:
            while True:
                b0, b1 = self._exact(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._exact(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._exact(8))[0]
                payload = self._exact(n)
                op = b0 & 0x0F
                item = json.loads(payload) if op == 1 else ("binary", n) if op == 2 else None
                if item is not None:
                    with self.lock:
                        self.messages.append((time.time(), item))
        except (EOFError, OSError):
            return

    def since(self, start: int) -> list:
        with self.lock:
            return [m for _, m in self.messages[start:]]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_pack(dst: Path) -> None:
    """The pack as a user gets it: the tracked (and new, not ignored) files of this checkout."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def _stub_torchaudio(python: str, base: Path, env: dict) -> None:
    """ComfyUI 0.33 imports torchaudio at start (audio VAEs, Gemma 4); a CPU environment whose torch
    has no matching torchaudio wheel gets an empty stand-in package on PYTHONPATH (no test uses audio)."""
    if subprocess.run([python, "-c", "import torchaudio"], capture_output=True).returncode == 0:
        return
    stub = base / "stubs" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "functional.py", "transforms.py"):
        (stub / name).write_text('"""Stand-in for tests: no audio here."""\n')
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub.parent), env.get("PYTHONPATH")]))


class Comfy:
    def __init__(self, base: Path):
        self.base, self.port = base, _free_port()
        self.log_path = base / "comfyui.log"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        _stub_torchaudio(python, base, env)
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory",
             str(base), "--disable-auto-launch"],
            cwd=COMFYUI, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        else:
            raise RuntimeError(f"ComfyUI did not answer in 240 s: {self.log()[-3000:]}")
        self.client_id = uuid.uuid4().hex
        self.ws = Socket(self.port, self.client_id)

    def log(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def request(self, path: str, data: dict | None = None, raw: bool = False):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            content = r.read()
        return content if raw else json.loads(content or b"null")

    def get(self, path: str, raw: bool = False):
        return self.request(path, raw=raw)

    def submit(self, prompt: dict) -> tuple[str | None, dict | None]:
        """(prompt_id, None), or (None, the validation error ComfyUI answered with)."""
        try:
            return self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"], None
        except urllib.error.HTTPError as exc:
            return None, json.loads(exc.read() or b"{}")

    def wait(self, prompt_id: str, start: int, timeout: float = 600) -> tuple[str, list]:
        """Wait for the prompt to end: ('success' | 'error' | 'interrupted', its messages)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            msgs = self.since_for(prompt_id, start)
            for m in msgs:
                if isinstance(m, dict):
                    kind, data = m.get("type"), m.get("data", {})
                    if kind == "execution_error":
                        return "error", msgs
                    if kind == "execution_interrupted":
                        return "interrupted", msgs
                    if kind == "executing" and data.get("node") is None:
                        return "success", msgs
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def since_for(self, prompt_id: str, start: int) -> list:
        """Messages since ``start`` that belong to ``prompt_id`` (binary previews carry no id: kept)."""
        return [m for m in self.ws.since(start)
                if not isinstance(m, dict) or m.get("data", {}).get("prompt_id") in (prompt_id, None)]

    def run(self, prompt: dict, timeout: float = 600) -> tuple[str, list, dict, float]:
        start, t0 = self.ws.count(), time.perf_counter()
        pid, err = self.submit(prompt)
        assert pid, f"prompt refused: {err}"
        status, msgs = self.wait(pid, start, timeout)
        return status, msgs, self.get(f"/history/{pid}").get(pid, {}), time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from tests.comfy_fixtures import make_models

    base = tmp_path_factory.mktemp("comfy-base")
    make_models(base / "models")
    _copy_pack(base / "custom_nodes" / PACK)
    server = Comfy(base)
    REPORT["comfyui"] = {"path": COMFYUI, "commit": _commit(), "version": _comfy_version()}
    yield server
    server.stop()
    out = os.environ.get("BONSAI_COMFY_REPORT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=1))


def _commit() -> str:
    if os.environ.get("COMFYUI_COMMIT"):  # a checkout unpacked without .git
        return os.environ["COMFYUI_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=COMFYUI, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _comfy_version() -> str:
    text = (Path(COMFYUI) / "comfyui_version.py").read_text() if (Path(COMFYUI) / "comfyui_version.py").exists() else ""
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else "unknown"


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- what ComfyUI sees
def test_pack_imports_and_its_nodes_are_listed(comfy):
    log = comfy.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK in line]
    assert failed == [], log[-3000:]  # core's own optional extras may fail here for missing packages
    assert re.search(rf"seconds: .*custom_nodes[/\\]{PACK}\s*$", log, re.M), log[-3000:]
    info = comfy.get("/object_info")
    for node in NODES:
        assert info[node]["category"] == "Bonsai" and info[node]["description"], node
    listed = info["BonsaiLoader"]["input"]["required"]["model"][0]
    assert listed[0] == "bonsai-shapes" and "bonsai-sd-tiny" in listed  # the shipped model first: the default
    native = info["BonsaiDiffusionModelLoader"]["input"]["required"]["model_name"][0]
    assert {"bonsai-sd15", "bonsai_image_4b-q1_0.gguf"} <= set(native), native


NODES = ("BonsaiLoader", "BonsaiSampler", "BonsaiGuardrail", "BonsaiTextOverlay", "BonsaiDiffusionModelLoader",
         "BonsaiTextEncoderLoader", "BonsaiLoRA")


def test_help_pages_and_templates_are_served(comfy):
    for node in NODES:
        page = comfy.get(f"/extensions/{PACK}/docs/{node}.md", raw=True).decode()
        assert page == (ROOT / "web" / "docs" / f"{node}.md").read_text(), node
    templates = comfy.get("/workflow_templates")
    ours = set(templates[PACK])
    assert ours == {p.stem for p in (ROOT / "workflows").glob("*.json")}
    jpg = comfy.get(f"/api/workflow_templates/{PACK}/bonsai_txt2img.jpg", raw=True)
    assert jpg[:3] == b"\xff\xd8\xff"


# expected output size of each SaveImage, by filename prefix: (width, height, count)
EXPECTED = {
    "bonsai_txt2img": {"bonsai/txt2img": (384, 384, 1)},
    "bonsai_guardrail_sampler": {"bonsai/guardrail": (384, 384, 1)},  # 380 -> 384 in clamp mode
    "bonsai_txt2img_text_overlay": {"bonsai/overlay": (384, 384, 1)},
    "bonsai_txt2img_model_upscale": {"bonsai/upscale_x4": (1536, 1536, 1)},
    "bonsai_txt2img_scale_by": {"bonsai/scale_by": (576, 576, 1)},
    "bonsai_batch_of_prompts": {"bonsai/batch_1": (384, 384, 2), "bonsai/batch_2": (384, 384, 1),
                                "bonsai/batch_3": (384, 384, 1)},
    "bonsai_image_4b": {"bonsai/image_4b": (1024, 1024, 1)},
    # native MODEL workflows, run at the sizes TINY_RUN sets (x1.5 by ImageScaleBy, x4 by the ESRGAN)
    "bonsai_native_image_4b": {"bonsai/native_image_4b": (384, 384, 1)},
    "bonsai_native_lora": {"bonsai/native_lora": (384, 384, 1)},
    "bonsai_native_sd15": {"bonsai/native_sd15": (512, 512, 1)},
}
NEEDS_KLEIN = {"bonsai_native_image_4b", "bonsai_native_lora"}  # core FLUX.2 nodes: ComfyUI 0.33+
# What a CPU test changes in a native workflow: 256-pixel klein and 128-pixel SD images, and CLIP-L in
# place of klein's Qwen3-4B text encoder (core builds that at its real 4B size whatever the file; the
# tiny klein reads 768-wide text).
TINY_RUN = {
    "EmptyFlux2LatentImage": {"width": 256, "height": 256}, "Flux2Scheduler": {"width": 256, "height": 256},
    "EmptyLatentImage": {"width": 128, "height": 128},
    "CLIPLoader": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"},
}


def _tiny_run(wf: dict) -> dict:
    for node in wf.values():
        node["inputs"].update(TINY_RUN.get(node["class_type"], {}))
    return wf


def test_every_api_workflow_has_an_expectation():
    assert set(EXPECTED) == {p.stem for p in (ROOT / "workflows" / "api").glob("*.json")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_api_workflow_runs_and_writes_its_images(comfy, name):
    """Each workflow's samplers use their own seeds, so ComfyUI's cache never skips one."""
    from PIL import Image

    if name in NEEDS_KLEIN and "EmptyFlux2LatentImage" not in comfy.get("/object_info/EmptyFlux2LatentImage"):
        pytest.skip(f"ComfyUI {REPORT['comfyui']['version']} has no FLUX.2 [klein] nodes")
    wf = _tiny_run(_workflow(name))
    status, msgs, history, seconds = comfy.run(wf)
    assert status == "success", [m for m in msgs if isinstance(m, dict) and m.get("type") == "execution_error"]
    saved = {}
    for node_id, out in history["outputs"].items():
        prefix = wf[node_id]["inputs"]["filename_prefix"]
        saved[prefix] = [comfy.base / "output" / i["subfolder"] / i["filename"] for i in out.get("images", [])]
    assert set(saved) == set(EXPECTED[name])
    for prefix, (w, h, count) in EXPECTED[name].items():
        assert len(saved[prefix]) == count, prefix
        for path in saved[prefix]:
            with Image.open(path) as img:
                assert img.size == (w, h), path
                assert img.getextrema() != ((0, 0), (0, 0), (0, 0)), f"{path} is black"
    samplers = {k: v for k, v in wf.items() if v["class_type"] == "BonsaiSampler"}
    progress = [m["data"] for m in msgs if isinstance(m, dict) and m.get("type") == "progress"]
    previews = sum(1 for m in msgs if not isinstance(m, dict))
    for node_id, node in samplers.items():
        steps = node["inputs"]["steps"]
        steps = steps if isinstance(steps, int) else 20  # wired from the guardrail (20 there)
        mine = [p for p in progress if p["node"] == node_id]
        # our updates: encode, sampling starts, every step, decode, done (newer ComfyUI throttles the
        # ones without a preview, but always sends the first, the last and every step's preview)
        assert steps + 2 <= len(mine) <= steps + 4, (node_id, len(mine))
        assert mine[-1]["value"] == mine[-1]["max"] == steps + 2
    assert previews >= sum(n["inputs"]["steps"] if isinstance(n["inputs"]["steps"], int) else 20
                           for n in samplers.values())
    REPORT["workflows"][name] = {"seconds": round(seconds, 1), "progress_messages": len(progress),
                                 "preview_frames": previews, "images": sum(len(v) for v in saved.values())}


def test_two_lora_nodes_off_one_loader_keep_their_own_loras_through_comfyuis_cache(comfy):
    """Loader -> (sampler), (LoRA a -> sampler), (LoRA b -> sampler); then only b's strength changes:
    ComfyUI reruns b's branch alone, from its cached Loader output, and the other two images stay."""
    import numpy as np
    import torch
    from PIL import Image

    from tests import lora_fixtures as lf

    loras = comfy.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name, seed in (("style_a.safetensors", 1), ("style_b.safetensors", 2)):
        shapes = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (128, 128),
                  "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (128, 128)}
        mods = {m: type("W", (), {"weight": torch.zeros(s)})() for m, s in shapes.items()}
        pairs = {("unet", k): v for k, v in lf.random_pairs(mods, rank=4, seed=seed, scale=0.3).items()}
        lf.write_kohya(loras / name, pairs, {k: 4.0 for k in pairs})
    base = {"class_type": "BonsaiLoader", "inputs": {"model": "bonsai-sd-tiny", "device": "auto", "dtype": "auto",
                                                     "path": ""}}

    def sampler(pipe):
        return {"class_type": "BonsaiSampler", "inputs": {
            "pipe": [pipe, 0], "prompt": "a fox", "negative": "", "seed": 5, "steps": 2, "cfg": 5.0, "width": 64,
            "height": 64, "sampler": "euler", "karras": False, "batch": 1}}

    def graph(strength_b):
        return {"1": base,
                "2": {"class_type": "BonsaiLoRA", "inputs": {"pipe": ["1", 0], "lora": "style_a.safetensors",
                                                              "strength": 1.0}},
                "3": {"class_type": "BonsaiLoRA", "inputs": {"pipe": ["1", 0], "lora": "style_b.safetensors",
                                                              "strength": strength_b}},
                "4": sampler("1"), "5": sampler("2"), "6": sampler("3"),
                **{str(7 + i): {"class_type": "SaveImage", "inputs": {"images": [src, 0],
                                                                        "filename_prefix": f"bonsai/lora_{tag}"}}
                   for i, (src, tag) in enumerate((("4", "none"), ("5", "a"), ("6", "b")))}}

    def images(history):
        out = {}
        for node_id, o in history["outputs"].items():
            for i in o.get("images", []):
                with Image.open(comfy.base / "output" / i["subfolder"] / i["filename"]) as im:
                    out[node_id] = np.asarray(im.convert("RGB")).astype(int)
        return out

    status, msgs, history, _s = comfy.run(graph(1.0))
    assert status == "success", [m for m in msgs if isinstance(m, dict) and m.get("type") == "execution_error"]
    first = images(history)
    assert set(first) == {"7", "8", "9"}
    assert not np.array_equal(first["7"], first["8"]) and not np.array_equal(first["8"], first["9"])
    status, msgs, history, _s = comfy.run(graph(0.5))
    assert status == "success"
    ran = {m["data"]["node"] for m in msgs if isinstance(m, dict) and m.get("type") == "executing"
           and m["data"].get("node")}
    assert {"3", "6", "9"} <= ran and not ran & {"1", "2", "4", "5"}  # only b's branch ran again
    second = images(history)
    assert not np.array_equal(second["9"], first["9"])
    # the no-LoRA branch once more, after the LoRA runs left adapters attached in the engine: the same
    # model named by path makes ComfyUI run loader and sampler again, on the engine already loaded
    wf = graph(1.0)
    wf["1"] = {"class_type": "BonsaiLoader", "inputs": dict(base["inputs"], path=str(
        comfy.base / "models" / "bonsai" / "bonsai-sd-tiny"))}
    wf["7"]["inputs"]["filename_prefix"] = "bonsai/lora_none_again"
    status, msgs, history, _s = comfy.run({k: wf[k] for k in ("1", "4", "7")})
    assert status == "success"
    assert np.array_equal(images(history)["7"], first["7"])


def test_native_lora_strength_change_reuses_the_loaded_model_and_changes_the_image(comfy):
    """A new LoRA strength re-runs the LoRA node and the sampler, not the Bonsai loader (ComfyUI's cache
    keeps its MODEL): no reload, and the image follows the strength."""
    from PIL import Image

    if "EmptyFlux2LatentImage" not in comfy.get("/object_info/EmptyFlux2LatentImage"):
        pytest.skip(f"ComfyUI {REPORT['comfyui']['version']} has no FLUX.2 [klein] nodes")
    images = []
    for strength in (0.0, 3.0):
        wf = _tiny_run(_workflow("bonsai_native_lora"))
        wf["2"]["inputs"]["strength_model"] = strength
        wf["15"]["inputs"]["filename_prefix"] = f"bonsai/lora_strength_{strength}"
        status, msgs, history, _ = comfy.run(wf)
        assert status == "success"
        cached = [n for m in msgs if isinstance(m, dict) and m.get("type") == "execution_cached"
                  for n in m["data"]["nodes"]]
        if images:  # second run: the Bonsai Diffusion Model Loader did not run again
            assert "1" in cached and "2" not in cached, cached
        (out,) = [o for o in history["outputs"].values() if o.get("images")]
        i = out["images"][0]
        with Image.open(comfy.base / "output" / i["subfolder"] / i["filename"]) as img:
            images.append(img.convert("RGB").tobytes())
    assert images[0] != images[1]


def test_interrupt_stops_sampling_within_one_step(comfy):
    wf = _workflow("bonsai_txt2img")
    wf["2"]["inputs"].update(steps=150, seed=9001)
    start = comfy.ws.count()
    pid, err = comfy.submit(wf)
    assert pid, err

    def last_value():
        values = [m["data"]["value"] for m in comfy.since_for(pid, start)
                  if isinstance(m, dict) and m.get("type") == "progress" and m["data"]["node"] == "2"]
        return values[-1] if values else -1

    deadline = time.time() + 300
    while last_value() < 4 and time.time() < deadline:  # a few steps in
        time.sleep(0.05)
    before = last_value()
    t0 = time.perf_counter()
    comfy.request("/interrupt", {})
    status, msgs = comfy.wait(pid, start, timeout=120)
    latency_s = time.perf_counter() - t0
    after = last_value()
    assert status == "interrupted"
    assert 4 <= before < 150
    assert after - before <= 1, (before, after)  # at most the step that was running finished
    errors = [m for m in msgs if isinstance(m, dict) and m.get("type") == "execution_error"]
    assert errors == []  # an interrupt is not an error
    REPORT["interrupt"] = {"steps_after_interrupt": after - before, "seconds": round(latency_s, 2),
                           "at_progress_value": before}


def _error_text(msgs) -> str:
    errs = [m["data"] for m in msgs if isinstance(m, dict) and m.get("type") == "execution_error"]
    return " ".join(f"{e.get('exception_type')}: {e.get('exception_message')}" for e in errs)


def test_bad_requests_fail_the_prompt_and_leave_the_server_up(comfy):
    results = {}
    # unknown model in the list: ComfyUI's validation refuses the prompt
    wf = _workflow("bonsai_txt2img")
    wf["1"]["inputs"]["model"] = "no-such-model"
    pid, err = comfy.submit(wf)
    assert pid is None and "no-such-model" in json.dumps(err)
    results["unknown model (list)"] = "refused at validation"
    # unknown model by path: the Loader fails with the engine's message
    wf = _workflow("bonsai_txt2img")
    wf["1"]["inputs"].update(model="(use the path input)", path="/nowhere/no-such-model")
    status, msgs, _, _ = comfy.run(wf)
    assert status == "error" and "BonsaiCheckpointError" in _error_text(msgs) and "no-such-model" in _error_text(msgs)
    results["unknown model (path)"] = _error_text(msgs)[:160]
    # size 0: below the Sampler's minimum (validation), and through the Guardrail in refuse mode
    wf = _workflow("bonsai_txt2img")
    wf["2"]["inputs"]["width"] = 0
    pid, err = comfy.submit(wf)
    assert pid is None and "width" in json.dumps(err)
    results["size 0 (sampler)"] = "refused at validation"
    wf = _workflow("bonsai_guardrail_sampler")
    wf["2"]["inputs"].update(width=0, mode="refuse")
    status, msgs, _, _ = comfy.run(wf)
    assert status == "error" and "width 0" in _error_text(msgs)
    results["size 0 (guardrail, refuse)"] = _error_text(msgs)[:160]
    # 100k characters: the prompt, and the overlay's text
    wf = _workflow("bonsai_txt2img")
    wf["2"]["inputs"]["prompt"] = "bonsai " * 14_285 + "tree!"
    status, msgs, _, seconds = comfy.run(wf, timeout=60)
    assert status == "error" and "100000 characters" in _error_text(msgs)
    results["100k-character prompt"] = f"{_error_text(msgs)[:160]} ({seconds:.1f} s)"
    wf = _workflow("bonsai_txt2img_text_overlay")
    wf["3"]["inputs"]["text"] = "x" * 100_000
    status, msgs, _, seconds = comfy.run(wf, timeout=600)
    assert status == "error" and "100000 characters" in _error_text(msgs)
    results["100k-character overlay text"] = f"{_error_text(msgs)[:160]} ({seconds:.1f} s)"
    # still up, and still working
    assert comfy.get("/system_stats")["system"]
    wf = _workflow("bonsai_txt2img")
    wf["2"]["inputs"].update(width=64, height=64, steps=2, seed=77)
    status, _, _, _ = comfy.run(wf)
    assert status == "success" and comfy.proc.poll() is None
    REPORT["bad_requests"] = results
