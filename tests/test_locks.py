"""The locks (requirements/*.lock, `make lock`) are bound to their inputs, satisfy them, hold no test tools at run
time, and every third-party import of the code is declared. Offline: `make lock-check` (CI) also resolves again."""

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402  (scripts/lock.py)

REQ = REPO / "requirements"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (a lock's hash lines and comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("spec", lock.LOCKS, ids=lambda s: s.name)
def test_each_lock_is_bound_to_its_inputs_and_satisfies_them(spec):
    path = REQ / f"{spec.name}.lock"
    assert lock.recorded_digest(path) == lock.inputs_digest(spec), f"{path.name} is stale: run `make lock`"
    assert lock.body_intact(path), f"{path.name} was edited by hand: run `make lock`"
    locked = _pins(path)
    for name in spec.inputs:
        for pkg, version in _pins(REQ / name).items():
            assert locked.get(pkg, "").split("+")[0] == version, f"{path.name}: {pkg} {locked.get(pkg)} != {version}"
    body = path.read_text()
    # every locked package carries its hash, so an install with --require-hashes takes exactly these files
    assert body.count("==") == len(locked) and all(
        "--hash=sha256:" in block for block in re.split(r"\n(?=[A-Za-z0-9])", body.split("\n", 3)[3]) if block)


def test_a_changed_input_makes_its_lock_stale(tmp_path, monkeypatch):
    spec = next(s for s in lock.LOCKS if s.name == "cpu")
    before = lock.inputs_digest(spec)
    fake = tmp_path / "requirements"
    fake.mkdir()
    for f in REQ.glob("*.in"):
        (fake / f.name).write_text(f.read_text())
    monkeypatch.setattr(lock, "REQ", fake)
    assert lock.inputs_digest(spec) == before
    (fake / "test.in").write_text((fake / "test.in").read_text() + "pytest-xdist==3.8.0\n")  # cpu follows cpu-test
    assert lock.inputs_digest(spec) != before


def test_a_hand_edited_lock_is_refused(tmp_path):
    path = tmp_path / "cpu.lock"
    text = (REQ / "cpu.lock").read_text()
    path.write_text(text)
    assert lock.body_intact(path)
    path.write_text(text.replace("transformers==5.19.0", "transformers==5.24.0"))
    assert not lock.body_intact(path) and lock.recorded_digest(path) == lock.recorded_digest(REQ / "cpu.lock")


def test_runtime_locks_hold_no_test_tools_and_one_transformers_line():
    tools = {"pytest", "selenium", "import-linter"}
    assert tools <= set(_pins(REQ / "cpu-test.lock"))
    for runtime in ("cpu.lock", "gpu.lock"):
        assert not tools & set(_pins(REQ / runtime)), runtime
    cpu, test, gpu = (_pins(REQ / f"{n}.lock") for n in ("cpu", "cpu-test", "gpu"))
    assert {k: v for k, v in test.items() if k in cpu} == cpu  # the Airflow image runs the tested versions
    assert cpu["transformers"] == gpu["transformers"] and cpu["transformers"].startswith("5.19.")
    assert "httpx" not in {p for f in REQ.glob("*.in") for p in _pins(f)}  # pinned, never imported
    # PyPI's torchvision/torchaudio are CUDA builds that break `import vllm` beside the CPU torch
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(cpu) and cpu["torch"] == "2.13.0+cpu"


def _third_party_imports() -> dict[str, str]:
    own = {"pipeline", "plugins", "dags", "tests", "benchmarks", "scripts", "lock"}
    found: dict[str, str] = {}
    for root in ("pipeline", "plugins", "dags"):
        for f in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own:
                        found.setdefault(top, str(f.relative_to(REPO)))
    return found


def test_every_import_of_the_code_is_declared():
    from importlib.metadata import packages_distributions

    declared = set(_pins(REQ / "cpu.in"))
    if "apache-airflow" in declared:  # a meta-package: the `airflow` module is its core's and its task SDK's
        declared |= {"apache-airflow-core", "apache-airflow-task-sdk"}
    dists = packages_distributions()
    optional = {"flash_attn"}  # GPU-only, imported under `except ImportError` (pipeline/training/models.py)
    missing = []
    for module, where in sorted(_third_party_imports().items()):
        if module in optional:
            continue
        names = {_norm(d) for d in dists.get(module, [])}
        if not names & declared:
            missing.append(f"{module} ({where}; distributions {sorted(names) or 'none installed'})")
    assert not missing, "imported but not pinned in requirements/cpu.in: " + ", ".join(missing)
