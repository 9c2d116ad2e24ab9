"""The seeded 50/50 train/test split of cases (SPEC §5.1) and contiguous case ranges for shards (SPEC §2.9)."""

from __future__ import annotations

import random

#: Number of cases in the ToolEmu test set; the study's split and shard ranges assume it.
TOOLEMU_CASES = 144


def test_cases(seed: int, n_cases: int = TOOLEMU_CASES) -> list[int]:
    """Sorted test case indices for a split seed: CPython's shuffle of ``range(n)``, second half.

    Every stage splits with the default n = 144 (the study's), also for smaller case sets such as the demo's:
    a case is a test case when its index is in the study's test split, so emulation (--test-only), pair
    building, training validation and the analysis partition agree on any case set.

    Identical to the study's ``random.seed(seed); random.shuffle(...)`` but without touching the global
    ``random`` state.
    """
    order = list(range(n_cases))
    random.Random(seed).shuffle(order)
    return sorted(order[n_cases // 2 :])


def train_cases(seed: int, n_cases: int = TOOLEMU_CASES) -> list[int]:
    """Sorted train case indices for a split seed (the complement of ``test_cases``)."""
    test = set(test_cases(seed, n_cases))
    return [i for i in range(n_cases) if i not in test]


def split_cases(seed: int, n_cases: int = TOOLEMU_CASES) -> tuple[list[int], list[int]]:
    """(train, test) case indices for a split seed."""
    test = test_cases(seed, n_cases)
    test_set = set(test)
    return [i for i in range(n_cases) if i not in test_set], test


def contiguous_ranges(n_parts: int, n_cases: int = TOOLEMU_CASES) -> list[tuple[int, int]]:
    """``n_parts`` half-open ranges covering ``range(n_cases)``; the first ``n_cases % n_parts`` get one more.

    With 10 parts over 144 cases: (0,15), (15,30), …, (60,74), …, (130,144), as the study's shards.
    """
    if not 1 <= n_parts <= max(1, n_cases):
        raise ValueError(f"n_parts must be between 1 and {n_cases}, got {n_parts}")
    base, extra = divmod(n_cases, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def parse_case_indices(text: str) -> list[int]:
    """``START-END`` (half-open), ``a,b,c`` or a single index → sorted unique indices."""
    text = text.strip()
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-", 1))
            if not 0 <= a < b:
                raise ValueError
            return list(range(a, b))
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"case indices '{text}': expected START-END with 0 <= START < END, a,b,c or N") from None
