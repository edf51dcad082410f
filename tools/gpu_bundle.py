"""Build `.bundle/`: what the GPU machines lack for the workbook's Unsloth path, slim enough to travel with a call.

Those machines have Python 3.12, PyTorch 2.11 (CUDA 13.0), transformers, peft and accelerate, but not unsloth,
unsloth_zoo, trl, bitsandbytes, datasets or the notebook runner, and a call carries at most 64 MiB. The plain
wheels of unsloth and bitsandbytes alone pass that: unsloth's carries a `studio/` web app and bitsandbytes one
library per CUDA version. This script downloads each wheel the workbook needs (and what those need, less what
the machine has), removes those parts, and writes:

    .bundle/wheels/*.whl     installed there with pip install --no-index --no-deps --target /tmp/site
    .bundle/tokenizer/       the embedded model's tokenizer, for the Llama-shaped test models (tools/llama_shapes.py)

Then `tools/gpu_device.sh` runs the benchmark and the notebooks there (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # what one device call carries, the working tree included


def _pins() -> dict[str, str]:
    """pyproject.toml's pins (shared and gpu extra), by package name: the bundle follows the one declaration."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    return {canonicalize_name(s.split("==")[0]): s for s in specs}


# What the workbook's GPU path imports (notebooks 01-07 under papermill), pinned as in pyproject.toml's gpu set
# (deepspeed is left out: it is only for the multi-GPU launchers and builds its ops on the machine).
ROOTS = [_pins()[canonicalize_name(name)] for name in (
    "unsloth", "unsloth_zoo", "bitsandbytes", "trl", "datasets", "papermill", "ipykernel", "ipywidgets", "pydantic",
    "python-dotenv",
)]  # fmt: skip
# On the GPU machines' image ('cuda'), as listed by the device tool on 2026-11-17: not bundled.
ON_DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 hf-xet
httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver lxml markdown markdown-it-py markupsafe matplotlib
mdurl ml-dtypes mpmath msgpack multidict networkx numpy nvidia-ml-py packaging pandas pathspec peft pillow pip
pluggy propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors
scipy sentencepiece setuptools shellingham six sympy tabulate tokenizers torch torchaudio torchvision tqdm
transformers triton typer typing-extensions urllib3 wheel xxhash yarl zipp sacrebleu einops""".split()
# Needed by name but unused on this path, and large: left out on purpose.
LEFT_OUT = {
    "xformers": "about 100 MB; Unsloth uses PyTorch's scaled-dot-product attention without it",
    "hf-transfer": "a downloader; the machine is offline",
}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
for tag in ["manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014", "manylinux1"]:
    PLATFORM += ["--platform", f"{tag}_x86_64"]
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}  # fmt: skip
# Parts of wheels the path never touches: (wheel name prefix, path prefix to keep or drop).
STRIP = {
    "unsloth-": lambda name: name.startswith(("studio/", "unsloth_cli/")),
    "bitsandbytes-": lambda name: name.endswith(".so") and not name.endswith(("_cuda130.so", "_cpu.so")),
}


def download(spec: str, folder: Path) -> Path:
    """One wheel for the GPU machine's Python and platform, without its dependencies."""
    before = set(folder.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(folder), spec],
        check=True,
    )
    (wheel,) = set(folder.glob("*.whl")) - before
    return wheel


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    found = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(MARKERS):
                found.append(req)
    return found


def pinned(req: Requirement) -> str:
    """The version this project runs with here, when it satisfies the requirement; else pip's choice."""
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return f"{req.name}{req.specifier}"
    return f"{req.name}=={installed}" if req.specifier.contains(installed, prereleases=True) else str(req)


def slim(wheel: Path, drop) -> int:
    """Rewrite the wheel without the dropped files (RECORD updated); returns bytes saved."""
    size = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = [i for i in src.infolist() if not drop(i.filename) and i.filename != record_name]
        record = []
        for info in kept:
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join([*record, f"{record_name},,"]) + "\n")
    tmp.replace(wheel)
    return size - wheel.stat().st_size


def tree_size() -> int:
    """Bytes of the working tree that travels with a call (tracked and untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def build(target: Path) -> None:
    wheels = target / "wheels"
    shutil.rmtree(target, ignore_errors=True)
    wheels.mkdir(parents=True)
    done: set[str] = set(map(canonicalize_name, ON_DEVICE)) | set(LEFT_OUT)
    queue = list(ROOTS)
    while queue:
        spec = queue.pop(0)
        name = canonicalize_name(Requirement(spec).name)
        if name in done:
            continue
        done.add(name)
        wheel = download(spec, wheels)
        for prefix, drop in STRIP.items():
            if wheel.name.startswith(prefix):
                print(f"  {wheel.name}: {slim(wheel, drop) / 2**20:.1f} MiB removed")
        print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB", flush=True)
        queue += [pinned(req) for req in requirements(wheel) if canonicalize_name(req.name) not in done]

    from transformers import AutoTokenizer  # the embedded model's tokenizer, converted once by helpers.model

    sys.path.insert(0, str(ROOT))
    from helpers.model import EMBEDDED, resolve_model

    AutoTokenizer.from_pretrained(resolve_model(EMBEDDED)).save_pretrained(target / "tokenizer")

    bundle = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    tree = tree_size()
    mib = 2**20
    print(f"\nbundle {bundle / mib:.1f} MiB + working tree {tree / mib:.1f} MiB = {(bundle + tree) / mib:.1f} MiB")
    print(f"(a call carries {LIMIT_MIB} MiB)")
    for name, why in LEFT_OUT.items():
        print(f"left out: {name} ({why})")
    if bundle + tree > LIMIT_MIB * 2**20:
        sys.exit("too large to carry: remove runs/ or other untracked files, or strip more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=ROOT / ".bundle")
    args = parser.parse_args()
    build(args.target)


if __name__ == "__main__":
    main()
