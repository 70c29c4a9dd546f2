"""Next-token sampling for the in-process engine, for one row or a whole batch, on the device.

One function serves both decode paths (the per-request loop and the batched fast path), so a
seeded request draws the same ids on either. The draw is an exponential race (``argmax p / E``
with ``E ~ Exp(1)``, as vLLM samples), not ``torch.multinomial``: it picks token ``i`` with
probability ``p_i`` exactly like a multinomial draw, but needs one noise kernel per row, and each
row's noise comes from that request's own generator, so a seeded request is reproducible
whatever runs beside it. Everything else is done once per group of rows that share their
sampling settings, and nothing here reads a value back to the host: the caller syncs once per
step when it reads the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stepaudio.llm.engine import RepetitionRule, SamplingParams

#: Exponential noise is clamped away from 0: ``p / 0`` would be inf (or NaN for a banned token).
_MIN_NOISE = 1e-20


@dataclass
class RowSampling:
    """What sampling one row needs: its settings, its request's generator and its ids so far."""

    params: SamplingParams
    generator: torch.Generator | None
    ids: Sequence[int]


def apply_repetition_rule(logits: torch.Tensor, ids: Sequence[int], rule: RepetitionRule) -> None:
    """Ban the newest id for one step if it fills more than ``max_ratio`` of the last window.

    In place, like the reference processor; ``ids`` include the prompt, as ``generate`` passes them.
    The decision is made on the host ids, so the device only sees one fill.
    """
    if len(ids) < rule.window:
        return
    window = ids[-rule.window :]
    last = window[-1]
    if sum(1 for t in window if t == last) / rule.window > rule.max_ratio:
        logits[last] = float("-inf")


def sample_rows(
    logits: torch.Tensor, rows: Sequence[RowSampling]
) -> tuple[torch.Tensor, dict[int, BaseException]]:
    """Next ids (a ``[rows]`` long tensor on ``logits``' device) and the rows whose hook failed.

    Order per row, as transformers' processors: logits hook, repetition rule, temperature,
    top-k, top-p, draw; greedy when ``temperature`` is 0. A row whose hook raises gets id -1 and
    its exception in the dict, so one broken request never costs the others their token.
    ``logits`` (``[rows, vocab]``) may be modified in place.
    """
    x = logits.float()
    errors: dict[int, BaseException] = {}
    for i, row in enumerate(rows):
        params = row.params
        if params.logits_hook is None and params.repetition is None:
            continue
        view = x[i]
        try:
            if params.logits_hook is not None:
                out = params.logits_hook(row.ids, view)
                if out is not view:
                    view.copy_(out)
            if params.repetition is not None:
                apply_repetition_rule(view, row.ids, params.repetition)
        except Exception as exc:  # the hook is user code: it fails its own request only
            errors[i] = exc
    tokens = torch.full((len(rows),), -1, dtype=torch.long, device=x.device)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        if i not in errors:
            p = row.params
            key = (0.0, 0, 1.0) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p)
            groups.setdefault(key, []).append(i)
    for (temperature, top_k, top_p), members in groups.items():
        every = members == list(range(len(rows)))
        index = None if every else index_tensor(members, x.device)
        sub = x if index is None else x.index_select(0, index)
        if temperature == 0:
            picked = sub.argmax(dim=-1)
        else:
            picked = _draw(sub, temperature, top_k, top_p, [rows[i].generator for i in members])
        if index is None:
            tokens = picked
        else:
            tokens.index_copy_(0, index, picked)
    return tokens, errors


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    ids: Sequence[int],
) -> int:
    """One row's next id as a Python int (syncs); raises what the row's hook raised."""
    tokens, errors = sample_rows(logits.reshape(1, -1), [RowSampling(params, generator, ids)])
    if errors:
        raise errors[0]
    return int(tokens[0])


def index_tensor(members: list[int], device: torch.device) -> torch.Tensor:
    """Row indices on ``device`` without a stream sync (pinned, asynchronous upload on CUDA)."""
    host = torch.tensor(members, dtype=torch.long)
    if device.type == "cuda":  # pinned + non_blocking: a plain upload would sync the stream
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _draw(
    x: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Temperature, top-k, top-p and the exponential race for rows sharing these settings."""
    x = x / temperature
    vocab = x.shape[-1]
    # Work on the few candidates only: top-k (sorted) first, then the nucleus inside it. With a
    # 74752-word vocabulary a full sort per token would cost more than a tiny model's forward.
    if 0 < top_k < vocab:
        values, index = torch.topk(x, top_k, dim=-1)
    elif top_p < 1.0:
        values, index = torch.sort(x, dim=-1, descending=True)
    else:
        values, index = x, None
    if top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        values = values.masked_fill(drop, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    choice = probs.div_(noise.clamp_min_(_MIN_NOISE)).argmax(dim=-1)
    if index is None:
        return choice
    return index.gather(1, choice[:, None])[:, 0]


__all__ = ["RowSampling", "apply_repetition_rule", "index_tensor", "sample_rows", "sample_token"]
