"""Fill a folder with what a bare GPU node needs to run benchmarks/gpu_check.py (``make gpu-wheels``).

The node (Python 3.12, CUDA torch, transformers, peft, accelerate; no network) lacks trl, datasets, bitsandbytes,
pydantic and pydantic-settings: their cp312 manylinux wheels are downloaded here (``--no-deps``: each missing
dependency is named below). bpe-openai's wheel (41 MB) does not fit beside bitsandbytes in one transfer, so the
cl100k vocabulary file it ships is put where tiktoken (on the node) finds it instead, and the ToolEmu cases and
toolkits are copied from the data directory for the emulation section. Nothing here is committed (the folder is
git-ignored). On the node:

    pip install -q --no-index --no-deps --target /tmp/site gpu-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
    export TIKTOKEN_CACHE_DIR=$PWD/gpu-wheels/tiktoken AGENTPIPE_DATA_DIR=$PWD/gpu-wheels/data
    python3 benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

#: the wheels the GPU image lacks (trl's and datasets' other needs are on it), pinned as in requirements/gpu.lock
WHEELS = ["trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "bitsandbytes==0.50.2",
          "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "pydantic-settings==2.16.3", "python-dotenv==1.2.4"]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
#: .venv has no pip (uv installs it): `make gpu-wheels` names the uv environment's Python, which has one
PIP_PYTHON = os.environ.get("PIP_PYTHON", sys.executable)
LIMIT_MB = 60  # the device tool carries at most 64 MiB with the working tree


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [PIP_PYTHON, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *plat, "-d", str(out), *WHEELS]
    if subprocess.run(cmd).returncode != 0:
        print("gpu-wheels: pip download failed", file=sys.stderr)
        return 1
    # tiktoken reads a cached vocabulary from TIKTOKEN_CACHE_DIR/<sha1 of its URL> and checks its sha256
    tmp = Path(out / "bpe")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([PIP_PYTHON, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp),
                    "bpe-openai==0.1.4"], check=True)
    [wheel] = tmp.glob("bpe_openai-*.whl")
    with zipfile.ZipFile(wheel) as z:
        vocab = gzip.decompress(z.read("bpe_openai/data/cl100k_base.tiktoken.gz"))
    shutil.rmtree(tmp)
    if hashlib.sha256(vocab).hexdigest() != CL100K_SHA256:
        print("gpu-wheels: bpe-openai's cl100k vocabulary is not the published one", file=sys.stderr)
        return 1
    cache = out / "tiktoken"
    cache.mkdir(exist_ok=True)
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(vocab)
    # the ToolEmu cases for the emulation section (the data directory does not travel to the node)
    from pipeline.settings import get_settings

    src = get_settings().resolved_data_dir / "toolemu"
    dst = out / "data" / "toolemu"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("all_cases.json", "all_toolkits.json"):
        shutil.copyfile(src / name, dst / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"gpu-wheels: {len(list(out.glob('*.whl')))} wheels, cl100k vocabulary, ToolEmu cases → {out} "
          f"({size:.1f} MB)")
    if size > LIMIT_MB:
        print(f"gpu-wheels: {size:.1f} MB is more than the {LIMIT_MB} MB a device transfer takes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-wheels")))
