"""Move training outputs through the GPU machine's limits: files under 16 MB, at most 8 a call.

    python training/pack.py teacher W/teacher OUT        # fp16 copy, tar, parts of 15 MB: OUT/teacher-fp16.tar.partNN
    python training/pack.py unpack-teacher DIR W/teacher # the parts of DIR back into a teacher folder
    python training/pack.py model W/student OUT/student.tar   # one tar; refused if it would be 16 MB or more

The teacher is carried in fp16 (the distillation loads it in fp32 again); its optimizer state does
not travel (too big): a teacher resumed on a fresh machine restarts Adam, a distillation restarts
from the teacher.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIMIT = 16 * 10**6
PART = 15 * 10**6


def _tar_bytes(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def pack_teacher(teacher: Path, out: Path) -> list[Path]:
    import json
    import shutil
    import tempfile

    import torch

    from bonsai_core.loader import component_class

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "teacher"
        shutil.copytree(teacher, dst)
        index = json.loads((teacher / "model_index.json").read_text())
        for name, entry in index.items():
            if isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers") \
                    and "Scheduler" not in entry[1] and "Tokenizer" not in entry[1]:
                shutil.rmtree(dst / name)
                m = component_class(*entry).from_pretrained(teacher / name, torch_dtype=torch.float32)
                m.to(torch.float16).save_pretrained(dst / name, safe_serialization=True)
        data = _tar_bytes(dst)
    parts = []
    for i in range(0, len(data), PART):
        p = out / f"teacher-fp16.tar.part{i // PART:02d}"
        p.write_bytes(data[i:i + PART])
        parts.append(p)
    print(f"teacher: {len(data) / 1e6:.1f} MB in {len(parts)} parts: {', '.join(p.name for p in parts)}")
    return parts


def unpack_teacher(parts_dir: Path, teacher: Path) -> Path:
    parts = sorted(parts_dir.glob("teacher-fp16.tar.part*"))
    if not parts:
        raise SystemExit(f"no teacher-fp16.tar.part* in {parts_dir}")
    data = b"".join(p.read_bytes() for p in parts)
    teacher.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        try:
            tar.extractall(teacher.parent, filter="data")
        except TypeError:  # Python before 3.11.4 has no filter; these are our own files
            tar.extractall(teacher.parent)
    extracted = teacher.parent / "teacher"
    if extracted != teacher:
        extracted.rename(teacher)
    print(f"unpacked {len(parts)} parts into {teacher}")
    return teacher


def pack_model(folder: Path, out: Path) -> Path:
    data = _tar_bytes(folder)
    if len(data) >= LIMIT:
        raise SystemExit(f"{folder} packs to {len(data) / 1e6:.1f} MB, over the 16 MB a returned file may be")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"{out}: {len(data) / 1e6:.2f} MB")
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("teacher", "unpack-teacher", "model"):
        raise SystemExit(__doc__)
    cmd, a, b = argv[0], Path(argv[1]), Path(argv[2])
    {"teacher": pack_teacher, "unpack-teacher": unpack_teacher, "model": pack_model}[cmd](a, b)


if __name__ == "__main__":
    main()
