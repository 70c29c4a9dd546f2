"""The transformers engine's batched fast path: continuous batching over decoder slots.

Why: a decode step of TTS-3B on a GPU is bound by reading the weights once, so decoding all
running requests in one call costs about what one request costs (bench/RESULTS.md), while the
per-request loop pays the whole step for each. Each request holds a
:class:`~stepaudio.llm.fast_decode.Step1FastDecoder` slot from admission to its end; requests
join (prefill, one chunk per round) and leave (stop, length, cancel, error) between steps.

One round, in the worker thread:

1. finish the cancelled requests (their slots are free before anything runs);
2. one prefill chunk per starting request; its last chunk's logits give its first token;
3. one ``decode`` of every running request; while the device runs it, post the previous step's
   tokens as text deltas (detokenizing is host work that would otherwise leave the GPU idle);
4. sample every row on the device (each with its own generator and settings).

Reading the sampled ids back is the step's one host sync. On a GPU, while the batch stays the
same (no join, no cancel), the next step is launched with the sampled ids still on the device
before they are read, so stop checks, text and the next sampling launches run while the device
computes; a request that ended on those ids costs one wasted row of that step. Any change to
the batch first reads the ids and accepts them, so a cancel is still honoured before that
request's next forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from stepaudio.llm.engine import Delta, FinishReason
from stepaudio.llm.fast_decode import Step1FastDecoder
from stepaudio.llm.sampler import RowSampling, index_tensor, sample_rows

if TYPE_CHECKING:
    from stepaudio.llm.engine_transformers import TransformersEngine, _Request

log = logging.getLogger(__name__)



def _slot(req: _Request) -> int:
    """The decoder slot of an admitted request (every one in a decode batch holds one)."""
    assert req.slot is not None
    return req.slot

class BatchedSteps:
    """The engine's ``_Steps`` over a :class:`Step1FastDecoder` (used from the worker only)."""

    def __init__(
        self,
        engine: TransformersEngine,
        *,
        max_batch: int,
        max_len: int,
        cuda_graphs: bool | None = None,
        prefix_slots: int = 0,
    ) -> None:
        if max_batch < 1 or max_len < 2:
            raise ValueError("fast decode needs max_batch >= 1 and max_len >= 2")
        self.engine = engine
        self.decoder = Step1FastDecoder(
            engine.model, max_batch=max_batch, max_len=max_len, use_cuda_graphs=cuda_graphs,
            prefix_slots=prefix_slots,
        )
        engine.decoder = self.decoder
        # Capture every bucket now, before serving: a capture in the middle of serving would
        # stall the running requests, and fails if another thread uses the GPU meanwhile.
        self.decoder.capture()
        self.decode_calls = 0
        #: Launch step t+1 before reading step t's ids (CUDA): the host's per-step work (reading
        #: the ids, stop checks, text, sampling launches) then overlaps the device's step instead
        #: of leaving the GPU idle. Pointless on CPU, where every op is synchronous anyway.
        self.overlap = self.decoder.device.type == "cuda"
        self._pending: tuple[list[_Request], torch.Tensor] | None = None
        self._last_rows: list[_Request] | None = None
        self._last_tokens: torch.Tensor | None = None

    # -- slots ---------------------------------------------------------------------------------
    def admit(self, req: _Request) -> bool:
        if not self.decoder.free_slots:
            return False
        req.slot = self.decoder.allocate()
        return True

    def release(self, req: _Request) -> None:
        if req.slot is not None:
            self.decoder.release(req.slot)
            req.slot = None

    # -- one round -----------------------------------------------------------------------------
    def step(self, active: list[_Request]) -> None:
        if self._pending is not None and self._steady(active):
            self._overlapped_step()
            return
        self._settle()
        live = [r for r in active if not self._cancelled(r)]
        starting = [r for r in live if r.prefilled < len(r.prompt_ids)]
        if starting:
            for req in live:  # a prefill takes a while: do not hold finished text behind it
                self._send(req)
            for req in starting:
                try:
                    self._prefill(req)
                except Exception as exc:  # one request's failure must not stop the others
                    log.exception("generation %s failed", req.stream.request_id)
                    self._fail(req, exc)
        rows = [
            r for r in live
            if r.slot is not None and r.prefilled == len(r.prompt_ids) and not self._cancelled(r)
        ]
        if rows:
            self._decode(rows)

    def _steady(self, active: list[_Request]) -> bool:
        """Nothing changes this round: the same rows run on and none was cancelled."""
        rows = self._pending[0] if self._pending else []
        return len(rows) == len(active) and all(
            a is b and a.slot is not None and not a.stream.cancelled
            for a, b in zip(active, rows, strict=True)
        )

    def _decode(self, rows: list[_Request]) -> None:
        same = self._last_rows is not None and len(rows) == len(self._last_rows) and all(
            a is b for a, b in zip(rows, self._last_rows, strict=True)
        )
        ids = self._last_tokens if same else [r.ids[-1] for r in rows]
        self._last_rows = self._last_tokens = None
        logits = self._forward(rows, ids)
        if logits is None:
            return
        for req in rows:  # host work while the device runs the step
            self._send(req)
        rows, tokens = self._sample(rows, logits)
        if self.overlap:
            self._pending = (rows, tokens) if rows else None
        else:
            self._accept_all(rows, tokens.tolist())  # the step's one device-to-host sync
            self._last_rows, self._last_tokens = rows, tokens

    def _overlapped_step(self) -> None:
        """Decode the pending ids, then read them while the device runs that very step."""
        assert self._pending is not None
        rows, tokens = self._pending
        self._pending = None
        read = self._read_later(tokens)
        logits = self._forward(rows, tokens)
        if logits is None:
            return
        self._accept_all(rows, read())
        # Rows that ended on those ids (stop, length) computed one step for nothing; the rest
        # sample their next id from it.
        keep = [i for i, r in enumerate(rows) if r.slot is not None]
        for i in keep:
            self._send(rows[i])
        if len(keep) < len(rows):
            if not keep:
                return
            logits = logits.index_select(0, index_tensor(keep, logits.device))
        rows, tokens = self._sample([rows[i] for i in keep], logits)
        self._pending = (rows, tokens) if rows else None

    def _settle(self) -> None:
        """Read and accept the pending ids now (something changes this round)."""
        if self._pending is not None:
            rows, tokens = self._pending
            self._pending = None
            self._accept_all(rows, tokens.tolist())
            self._last_rows, self._last_tokens = rows, tokens

    def _forward(self, rows: list[_Request], ids: Any) -> torch.Tensor | None:
        try:
            logits = self.decoder.decode([_slot(r) for r in rows], ids)
        except Exception as exc:  # the batch's forward failed: no row has a token to go on
            log.exception("batched decode of %d requests failed", len(rows))
            for req in rows:
                self._fail(req, exc)
            return None
        self.decode_calls += 1
        self.engine.forward_calls += 1
        return logits

    def _sample(
        self, rows: list[_Request], logits: torch.Tensor
    ) -> tuple[list[_Request], torch.Tensor]:
        """Next ids on the device; rows whose hook failed end here and are left out."""
        tokens, errors = sample_rows(
            logits, [RowSampling(r.params, r.generator, r.ids) for r in rows]
        )
        if not errors:
            return rows, tokens
        for index, exc in errors.items():
            log.warning("generation %s failed in its logits hook: %s",
                        rows[index].stream.request_id, exc)
            self._fail(rows[index], exc)
        keep = [i for i in range(len(rows)) if i not in errors]
        return [rows[i] for i in keep], tokens.index_select(0, index_tensor(keep, tokens.device))

    def _read_later(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying ``tokens`` to the host; the callable waits for that copy only."""
        if tokens.device.type != "cuda":
            host = tokens.tolist()
            return lambda: host
        buffer = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        buffer.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tokens.device))

        def read() -> list[int]:
            done.synchronize()  # releases the GIL: the event loop runs meanwhile
            return buffer.tolist()

        return read

    def _accept_all(self, rows: list[_Request], tokens: list[int]) -> None:
        for req, token in zip(rows, tokens, strict=True):
            if req.slot is not None:
                self._accept(req, token)

    def _prefill(self, req: _Request) -> None:
        """One chunk of the prompt into the request's slot; the last one samples its first id."""
        assert req.slot is not None
        if req.prefilled == 0:  # a prompt that starts like a recent one copies that part
            req.prefilled = req.cached = self.decoder.reuse_prefix(req.slot, req.prompt_ids)
        chunk = req.prompt_ids[req.prefilled : req.prefilled + self.engine.prefill_chunk]
        logits = self.decoder.prefill(req.slot, chunk)
        self.decoder.count_prefill(len(chunk))
        self.engine.forward_calls += 1
        req.prefilled += len(chunk)
        if req.prefilled < len(req.prompt_ids):
            return
        self.decoder.keep_prefix(req.slot, req.prompt_ids)
        tokens, errors = sample_rows(logits[None], [RowSampling(req.params, req.generator, req.ids)])
        if errors:
            raise errors[0]
        self._accept(req, int(tokens[0]))
        self._send(req, now=True)  # the first token goes out at once: time to first token

    # -- bookkeeping ---------------------------------------------------------------------------
    def _accept(self, req: _Request, token: int) -> None:
        params = req.params
        req.completion += 1
        if token in params.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        req.ids.append(token)
        req.unsent.append(token)
        if req.completion >= params.max_new_tokens or len(req.ids) >= self.engine.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def _send(self, req: _Request, now: bool = False) -> None:
        """Post the request's unsent tokens as one delta once there are ``stream_interval`` of
        them (``now``: whatever there is)."""
        if len(req.unsent) >= (1 if now else self.engine.stream_interval):
            text = "".join(req.detok.add(t) for t in req.unsent)
            req.stream._post(Delta(text=text, token_ids=tuple(req.unsent)))
            req.unsent.clear()

    def _cancelled(self, req: _Request) -> bool:
        if req.slot is not None and req.stream.cancelled:
            self._finish(req, FinishReason.CANCELLED)
            return True
        return req.slot is None

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        if reason is FinishReason.CANCELLED:
            req.unsent.clear()  # the consumer drops text that arrives after its cancel anyway
        else:
            self._send(req, now=True)
        self.engine._finish(req, reason)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        req.unsent.clear()
        self.engine._fail(req, exc)
