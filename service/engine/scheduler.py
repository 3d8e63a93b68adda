"""Iteration-level (continuous) batching: rows join and leave the running batch at every decode step.

Each step first admits waiting requests (prefilled together, bounded by a token budget so running rows
are not stalled for long), merges their KV cache into the running batch, then decodes one token for
every running row. Each row has its own adapter (routed by the runtime), sampling settings and stop
conditions; finished and cancelled rows leave the batch at once.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from ..errors import NonFiniteLogitsError
from ..runtime import AdapterNotFoundError, AdapterRuntime
from . import kv_cache
from .sampling import TokenCounts, pick_token, process, row_generator, token_logprob
from .sequence import Sequence


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


class ContinuousBatcher:
    def __init__(
        self, model: nn.Module, tokenizer, runtime: AdapterRuntime, max_batch_size: int, prefill_token_budget: int
    ) -> None:
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos, default=0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cache: kv_cache.GrowingCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 = real position
        self._next_pos: torch.Tensor | None = None  # (B,) position id of each row's next token
        self._last: torch.Tensor | None = None  # (B,) last sampled token of each row

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def uses(self, adapter_id: str) -> bool:
        return any(s.request.adapter_id == adapter_id for s in (*self.running, *self.waiting))

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then decode one token for every running row."""
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self._drop_finished()
        admitted = self._take_admissible()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:
                # Rows that never reached `running` are in no list `fail_all` sees: fail them here, or their
                # callers would wait until their timeout.
                for s in admitted:
                    if s not in self.running:
                        s.finish_reason = "error"
                        s.emit(exc)
                raise
        if self.running:
            self._decode_step()
        self._drop_finished()  # finished rows leave now, not at the next step

    def _take_admissible(self) -> list[Sequence]:
        taken: list[Sequence] = []
        budget = self.prefill_token_budget
        while self.waiting and len(self.running) + len(taken) < self.max_batch_size:
            n = len(self.waiting[0].request.prompt_ids)
            if taken and n > budget:
                break
            seq = self.waiting.popleft()
            adapter_id = seq.request.adapter_id
            if adapter_id is not None and adapter_id not in self.runtime.adapters:
                seq.emit(AdapterNotFoundError(adapter_id))  # only this request fails, not the batch
                continue
            budget -= n
            taken.append(seq)
        return taken

    def _prefill(self, seqs: list[Sequence]) -> None:
        width = max(len(s.request.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            n = len(s.request.prompt_ids)
            ids[i, width - n:] = torch.tensor(s.request.prompt_ids, device=self.device)
            mask[i, width - n:] = 1
            s.generator = row_generator(s.request.params, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = kv_cache.GrowingCache()
        with self.runtime.route([s.request.adapter_id for s in seqs]):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            ).logits[:, -1, :]
        next_pos = positions[:, -1] + 1
        last = torch.full_like(next_pos, self.pad_id)
        if self._cache is None:
            self._cache, self._mask, self._next_pos, self._last = cache, mask, next_pos, last
        else:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, cache, mask)
            self._next_pos = torch.cat([self._next_pos, next_pos])
            self._last = torch.cat([self._last, last])
        self.running.extend(seqs)  # counted as running before their first token is reported
        self._last[-len(seqs):] = self._sample(seqs, logits)

    def _decode_step(self) -> None:
        self._drop_finished()
        if not self.running:
            return
        assert self._cache is not None and self._mask is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.running), 1))], dim=1)
        with self.runtime.route([s.request.adapter_id for s in self.running]):
            logits = self.model(
                input_ids=self._last[:, None], attention_mask=self._mask, position_ids=self._next_pos[:, None],
                past_key_values=self._cache, use_cache=True,
            ).logits[:, -1, :]
        self._last = self._sample(self.running, logits)
        self._next_pos = self._next_pos + 1

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Pick one token per row (finished rows keep a placeholder) and report it. A row whose scores are not
        finite (its adapter's weights overflow) fails alone; the other rows go on."""
        out = torch.full((len(seqs),), self.pad_id, dtype=torch.long, device=self.device)
        scores = self._processed(seqs, logits)
        finite = torch.isfinite(logits).all(dim=-1)  # (B,)
        greedy, finite_rows = scores.argmax(dim=-1).tolist(), finite.tolist()  # one device sync for every row
        for i, s in enumerate(seqs):
            if s.finish_reason is not None or s.cancelled:
                continue
            params = s.request.params
            if not finite_rows[i]:
                s.finish_reason = "error"
                s.emit(NonFiniteLogitsError(s.request.adapter_id, len(s.tokens)))
                continue
            token = greedy[i] if params.greedy else pick_token(scores[i], params, s.generator)
            if s.counts is not None:
                s.counts.add(token)
            logprob = None if params.logprobs is None else token_logprob(logits[i], token, params.logprobs,
                                                                          self._decode)
            s.add_token(token, self.eos, self._decode, logprob)
            out[i] = token
            if s.finish_reason is not None:
                s.emit(s.result())
        return out

    def _processed(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """(B, V) scores to choose from: the model's own, or a float copy with each row's logit processing."""
        rows = [i for i, s in enumerate(seqs) if s.request.params.processes_logits and s.finish_reason is None]
        if not rows:
            return logits
        scores = logits.float().clone()
        for i in rows:
            s, params = seqs[i], seqs[i].request.params
            if s.counts is None:
                s.counts = TokenCounts(params, s.request.prompt_ids, scores.shape[-1], scores.device)
            end_ids = [*(() if params.ignore_eos else sorted(self.eos)), *params.stop_token_ids]
            process(scores[i], params, s.counts, end_ids)
            if s.request.grammar is not None:  # last: only what the grammar allows may be chosen
                if s.grammar is None:
                    s.grammar = s.request.grammar.start()
                scores[i].masked_fill_(~s.grammar.allowed().to(scores.device), float("-inf"))
        return scores

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next_pos = self._last = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._mask = kv_cache.select_rows(self._cache, self._mask, index)
        self._next_pos, self._last = self._next_pos[index], self._last[index]

    def fail_all(self, exc: BaseException) -> None:
        """A step raised: every request in flight gets the error, and the batch starts empty."""
        for s in (*self.running, *self.waiting):
            s.finish_reason = s.finish_reason or "error"
            s.emit(exc)
        self.running, self.waiting = [], deque()
        self._cache = self._mask = self._next_pos = self._last = None
