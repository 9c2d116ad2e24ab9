"""Choice scoring on the HF backend: the log-probability of each of a few fixed answers (``"0"``…``"3"``) after a
prompt and an answer prefix, as the log-probability judge reads a score (``ChatBackend.score_choices``).

Single-token choices (the usual case: digits) take one forward pass per prompt for every choice; longer ones one
pass per prompt and choice, summing the choice tokens' log-probs. Passes are batched with left padding, or run one
unpadded prompt at a time from a cached prefix when the backend prefills per request (the CPU default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.llm.local_common import single_token_choices
from pipeline.llm.types import ChatRequest

if TYPE_CHECKING:
    from pipeline.llm.hf.backend import HFBackend

#: (prompt text with the answer prefix, peft adapter name or None)
Head = tuple[str, "str | None"]


def score_choices(backend: HFBackend, requests: Sequence[ChatRequest], prefix: str,
                  choices: Sequence[str]) -> list[list[float]]:
    """Sum of token log-probs of ``prefix + choice`` continuations' choice tokens, per request and choice."""
    names = backend.adapter_names(requests) or [None] * len(requests)
    all_heads = [(backend.render(r.messages) + prefix, name) for r, name in zip(requests, names)]
    heads = list(dict.fromkeys(all_heads))  # identical prompts (an evaluation's replicates) are scored once
    row_of = {h: i for i, h in enumerate(heads)}
    encode = lambda t: backend.tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    single = single_token_choices(encode, heads[0][0] if heads else prefix, choices)
    if single is not None:  # the usual case (digits): one forward pass per request scores every choice
        unique = _next_token_logprobs(backend, heads, single)
    else:
        unique = _choice_token_logprobs(backend, heads, choices)
    return [list(unique[row_of[h]]) for h in all_heads]


def _rows_per_pass(backend: HFBackend) -> int:
    """Rows per scoring forward pass: one (unpadded) when prefilling per request, else the batch size."""
    return 1 if backend.prefill_per_request else backend.batch_size


def _choice_token_logprobs(backend: HFBackend, heads: list[Head], choices: Sequence[str]) -> list[list[float]]:
    """Summed log-probs of each (possibly multi-token) choice after each (head, adapter name)."""
    import torch

    tok, model = backend.tok, backend.model
    rows = []  # (request index, choice index, token ids, number of choice tokens)
    for i, (head, _) in enumerate(heads):
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(choices):
            full = tok(head + choice, add_special_tokens=False)["input_ids"]
            n_choice = len(full) - len(head_ids)
            if n_choice < 1 or full[: len(head_ids)] != head_ids:  # the choice merged into the prefix
                n_choice = max(1, len(tok(choice, add_special_tokens=False)["input_ids"]))
            rows.append((i, j, full, n_choice))
    out = [[float("-inf")] * len(choices) for _ in heads]
    step = _rows_per_pass(backend)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        width = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (_, _, ids, _) in enumerate(chunk):
            input_ids[k, width - len(ids):] = torch.tensor(ids)
            mask[k, width - len(ids):] = 1
        keep = max(n for *_, n in chunk) + 1  # only the logits that predict the choice tokens
        adapter = ({"adapter_names": [heads[i][1] for i, *_ in chunk]} if heads[0][1] is not None else {})
        with torch.inference_mode():
            if step == 1 and backend.prefix is not None:  # one unpadded row: start from a cached prefix
                logits = backend.forward_reusing(input_ids.to(model.device), heads[chunk[0][0]][1],
                                                 adapter, keep)[0].logits.float()
            else:
                logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                               logits_to_keep=keep, **adapter).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, -(keep - 1):].to(logp.device)
        token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for k, (i, j, _, n_choice) in enumerate(chunk):
            out[i][j] = float(token_lp[k, -n_choice:].sum())
    return out


def _next_token_logprobs(backend: HFBackend, heads: list[Head], token_ids: list[int]) -> list[list[float]]:
    """Log-probs of each single-token choice as the next token after each (head, adapter name)."""
    import torch

    model = backend.model
    order = sorted(range(len(heads)), key=lambda i: len(heads[i][0]))
    results: dict[int, list[float]] = {}
    step = _rows_per_pass(backend)
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        enc = backend.tok([heads[i][0] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        adapter = {"adapter_names": [heads[i][1] for i in idx]} if heads[0][1] is not None else {}
        with torch.inference_mode():  # left padding: the last position is real
            if step == 1 and backend.prefix is not None:  # one unpadded row: start from a cached prefix
                logits = backend.forward_reusing(enc["input_ids"], heads[idx[0]][1], adapter)[0].logits[:, -1]
                logits = logits.float()
            else:
                logits = model(**enc, logits_to_keep=1, **adapter).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)[:, token_ids]
        for k, i in enumerate(idx):
            results[i] = [float(x) for x in logp[k]]
    return [results[i] for i in range(len(heads))]
