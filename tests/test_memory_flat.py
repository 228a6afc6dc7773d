"""Memory stays flat: 50 tiny generations with model and LoRA switches in between. A replaced model
or adapter is freed (nothing of it stays reachable) and the process's resident memory does not
grow once every combination has run once (the GPU counterpart, measuring allocated memory, is
``benchmarks/lora_memory.py``)."""

from __future__ import annotations

import gc
import weakref

import pytest

from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import load_engine, unload_current
from bonsai_core.quant.layers import LoRABranch
from tests import lora_fixtures as lf
from tests.sd_fixtures import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GENERATIONS = 50
ALLOWED_GROWTH = 8 * 2**20  # bytes of resident memory after the warm-up round (measured: under 1 MiB)


def rss() -> int:
    import psutil

    gc.collect()
    try:  # give freed heap pages back, so that RSS counts what is live (glibc only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    models = [convert_pipeline(make_tiny_sd_pipeline(root / f"fp{i}", seed=i), root / f"bonsai{i}",
                               log=lambda m: None).dst for i in range(2)]
    eng = load_engine(str(models[0]), device="cpu", dtype="fp32")
    fam = eng.family
    loras = []
    for i in range(2):  # the two models share the layout, so each LoRA fits both
        mods = {m: fam.unet.get_submodule(m) for m in lf.UNET_TARGETS}
        te = {m: fam.text_encoder.get_submodule(m) for m in lf.TE_TARGETS}
        pairs = {("unet", k): v for k, v in lf.random_pairs(mods, rank=8, seed=10 + i).items()}
        pairs |= {("text_encoder", k): v for k, v in lf.random_pairs(te, rank=8, seed=20 + i).items()}
        loras.append(lf.write_kohya(root / f"lora{i}.safetensors", pairs, {k: 8.0 for k in pairs}))
    unload_current()
    yield models, loras
    unload_current()


def test_fifty_generations_with_model_and_lora_switches_keep_memory_flat(setup):
    models, loras = setup
    plans = [[], [(loras[0], 1.0)], [(loras[1], 0.5)], [(loras[0], 0.7), (loras[1], 0.3)]]
    samples, families = [], []
    warm = None
    for i in range(GENERATIONS):
        model = models[(i // 8) % 2]  # another model every 8 images
        eng = load_engine(str(model), device="cpu", dtype="fp32")
        if not families or families[-1]() is not eng.family:
            families.append(weakref.ref(eng.family))
        eng.use_loras(plans[i % len(plans)])  # another LoRA set every image
        eng.generate(f"prompt {i % 5}", steps=1, width=64, height=64, seed=i)
        if i == 2 * 8 - 1:  # both models and every LoRA set have run: the warm-up is over
            warm = rss()
        elif warm is not None and i % 3 == 0:  # (a full garbage collection per sample costs 0.2 s)
            samples.append(rss())
    live = sum(1 for o in gc.get_objects() if isinstance(o, LoRABranch))
    per_adapter = len(lf.UNET_TARGETS) + len(lf.TE_TARGETS)
    assert live == per_adapter * len(plans[(GENERATIONS - 1) % len(plans)])  # the last set's branches, no more
    assert sum(ref() is not None for ref in families[:-1]) == 0  # every replaced model was freed
    unload_current()
    assert families[-1]() is None and not any(isinstance(o, LoRABranch) for o in gc.get_objects())
    growth = max(samples) - warm
    print(f"RSS after warm-up {warm / 2**20:.1f} MiB, max growth {growth / 2**20:.2f} MiB over {len(samples)} "
          f"generations")
    assert growth < ALLOWED_GROWTH, f"resident memory grew {growth / 2**20:.1f} MiB over {len(samples)} generations"
    # no drift either: the last samples are no higher than the first ones after warm-up, beyond noise
    assert sum(samples[-3:]) / 3 - sum(samples[:3]) / 3 < ALLOWED_GROWTH / 2
