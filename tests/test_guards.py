"""A guard against new silent fallbacks: every broad exception handler (``except Exception``, ``except
BaseException``, bare ``except:``) in ``pipeline/`` and ``plugins/`` either re-raises or is listed below with the
reason it may swallow the error. A new one fails this test until it re-raises or its reason is written here (and
beside it in the code)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROAD = {"Exception", "BaseException"}

#: (file, function) → why a broad handler there may end without raising
ALLOWED: dict[tuple[str, str], str] = {
    ("pipeline/llm/hf/backend.py", "generate"): "a request whose chat template fails, or a batch whose generation fails, "
    "becomes failure responses for those requests (recorded, counted, retried by a rerun); OOM halves the batch",
    ("pipeline/llm/openai_backend.py", "_complete"): "every API failure is classified: retried, or a failure "
    "response recorded with its error",
    ("pipeline/llm/vllm_backend.py", "generate"): "a bad message list fails only its own request (a failure response)",
    ("pipeline/llm/vllm_backend.py", "_run"): "a failing vLLM job fails only its own requests (recorded as errors)",
    ("pipeline/llm/scripted.py", "generate"): "the test double turns its responder's error into a failure response, "
    "as a real backend does",
    ("pipeline/tracking/sender.py", "_send_one"): "an operation the tracking server refuses is retried by the next "
    "syncs, then recorded as rejected and counted; it never blocks the operations after it",
    ("pipeline/tracking/sender.py", "_experiment_id"): "a failed create is accepted only when the experiment "
    "exists after all (created concurrently by another process); otherwise the error is raised",
    ("pipeline/tracking/sender.py", "send"): "a failed operation is classified: refused credentials raise, an "
    "unreachable server keeps the journal for the next sync, a bad operation is retried then recorded rejected",
    ("pipeline/tracking/tracker.py", "flush"): "tracking must never fail a stage: the operations stay in the journal "
    "(files are the source of truth) and are sent by the next sync",
    ("plugins/openai_batch_trigger.py", "run"): "a poll that fails (the service away for a while) is logged and "
    "polled again at the next interval; the wait's deadline still ends it",
    ("plugins/dag_common.py", "_stage_totals"): "the totals are a convenience logged with a warning; the stage's own "
    "outcome is already decided",
}


def _is_broad(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in BROAD or isinstance(n, ast.Attribute) and n.attr in BROAD
               for n in names)


def _function_of(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node → the name of the innermost function that holds it (``<module>`` at top level)."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            owner[child] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def broad_handlers_without_raise(root: Path = ROOT) -> list[tuple[str, str, int]]:
    """(file, function, line) of every broad handler under pipeline/ and plugins/ with no ``raise`` inside."""
    found = []
    for folder in ("pipeline", "plugins"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            owner = _function_of(tree)
            for node in ast.walk(tree):
                # a handler re-raises when it ends with a raise on every path: a raise under a condition (or only
                # in some branch) lets the error be swallowed on the others, so such a handler must be listed
                swallows = (isinstance(node, ast.ExceptHandler) and _is_broad(node)
                            and not (node.body and isinstance(node.body[-1], ast.Raise)))
                if swallows or _is_broad_suppress(node):
                    found.append((path.relative_to(root).as_posix(), owner[node], node.lineno))
    return found


def _is_broad_suppress(node: ast.AST) -> bool:
    """``contextlib.suppress(Exception)``: a broad handler by another name."""
    if not isinstance(node, ast.Call):
        return False
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return name == "suppress" and any(isinstance(a, ast.Name) and a.id in BROAD or isinstance(a, ast.Attribute)
                                      and a.attr in BROAD for a in node.args)


def test_every_broad_exception_handler_reraises_or_has_a_listed_reason():
    unlisted = [f"{file}:{line} in {func}()" for file, func, line in broad_handlers_without_raise()
                if (file, func) not in ALLOWED]
    assert not unlisted, ("broad exception handlers that swallow the error without a listed reason (re-raise, "
                          "catch the specific exception, or add the reason to ALLOWED and beside the code): "
                          + "; ".join(unlisted))


def test_the_allowlist_names_only_handlers_that_exist():
    """A stale entry would silently allow a future handler in that function."""
    present = {(file, func) for file, func, _ in broad_handlers_without_raise()}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"allowlist entries without a broad handler any more: {stale}"


def test_the_guard_finds_a_swallowing_handler(tmp_path):
    """The scanner itself: a swallowing handler is found, a re-raising or narrow one is not."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "pipeline" / "m.py").write_text(
        "def quiet():\n    try:\n        pass\n    except Exception:\n        return 0\n"
        "def bare():\n    try:\n        pass\n    except:\n        pass\n"
        "def loud():\n    try:\n        pass\n    except Exception as e:\n        raise ValueError() from e\n"
        "def narrow():\n    try:\n        pass\n    except OSError:\n        pass\n"
        "def sometimes(x):\n    try:\n        pass\n    except Exception:\n        if x:\n            raise\n"
        "def hushed():\n    import contextlib\n    with contextlib.suppress(Exception):\n        pass\n")
    assert broad_handlers_without_raise(tmp_path) == [("pipeline/m.py", "quiet", 4), ("pipeline/m.py", "bare", 9),
                                                      ("pipeline/m.py", "sometimes", 24),
                                                      ("pipeline/m.py", "hushed", 29)]
