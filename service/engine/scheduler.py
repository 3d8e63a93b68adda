"""Iteration-level (continuous) batching: rows join and leave the running batch at every decode step.

Each step first admits waiting requests (prefilled together, bounded by a token budget so running rows
are not stalled for long), merges their KV cache into the running batch, then decodes one token for
every running row. Each row has its own adapter (routed by the runtime), sampling settings and stop
conditions; finished and cancelled rows leave the batch at once.

Admission prefills each distinct (adapter, prompt) once: copies (a request's n > 1 choices) get the rows of
that one prefill, then sample on their own. With a `PrefixCache`, a prompt that starts with cached blocks
prefills only the rest on top of their keys/values; rows with different cached lengths sit in one forward
as  [pad | cached | pad | rest], with the attention mask marking the real columns (position ids follow the
mask, so they are the same as without the cache).

An adapter's requests can be parked (`park`) while its weights are swapped out for another adapter's, and put
back (`unpark`) once they are attached again: see parking.py.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteLogitsError
from ..runtime import AdapterNotFoundError, AdapterRuntime
from . import kv_cache
from .parking import ParkedRows
from .prefix_cache import PrefixBlock, PrefixCache
from .sampling import TokenCounts, greedy_tokens, pick_token, process, row_generator, token_logprob
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


def grouped_order(keys: list[str | None], group_key: Callable[[str | None], tuple] | None = None) -> list[int] | None:
    """The row order that makes each adapter's rows one contiguous run (groups sorted by `group_key`, then in order
    of first appearance; rows in their order within a group), or None when it is the order they have: the stacked
    LoRA path then applies each adapter to a slice of the batch, with no per-row gather
    (runtime/adapter_types/lora/stacked.py)."""
    first: dict[str | None, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    rank = {key: (group_key(key) if group_key else (), i) for key, i in first.items()}
    order = sorted(range(len(keys)), key=lambda i: rank[keys[i]])
    return None if order == list(range(len(keys))) else order


@dataclass(eq=False)
class _Prompt:
    """One distinct (adapter, prompt) of an admission: the rows that share its prefill, and its cached blocks."""

    adapter_id: str | None
    prompt_ids: list[int]
    blocks: list[PrefixBlock]
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return sum(b.kv.shape[3] for b in self.blocks)


class ContinuousBatcher:
    def __init__(
        self, model: nn.Module, tokenizer, runtime: AdapterRuntime, max_batch_size: int, prefill_token_budget: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos, default=0)
        self.prefix_cache = prefix_cache
        # A prefill needs only its last position's logits: the LM head over every prompt token cost a third of a
        # prefill's time (transformers' own generate asks for the last one only too).
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            model.forward).parameters else {}
        # Adapter id -> (its record, fused) when its blocks were cached: blocks of a changed adapter are dropped.
        self._cached_versions: dict[str, tuple[weakref.ref, bool]] = {}
        self.prefill_rows = 0  # rows prefilled (copies of one prompt count once): what sharing saves shows here
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: dict[str, ParkedRows] = {}  # adapter id -> its requests held out of the batch
        self._cache: kv_cache.GrowingCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) 1 = real position
        self._next_pos: torch.Tensor | None = None  # (B,) position id of each row's next token
        self._last: torch.Tensor | None = None  # (B,) last sampled token of each row

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def uses(self, adapter_id: str) -> bool:
        return adapter_id in self.parked or any(s.request.adapter_id == adapter_id
                                                for s in (*self.running, *self.waiting))

    def forget_changed_adapters(self) -> None:
        """Drop the cached prefixes of every adapter that was deleted, unloaded, replaced, fused or unfused
        since they were computed (the engine calls this after each adapter change and before each step)."""
        for adapter_id, (ref, fused) in list(self._cached_versions.items()):
            loaded = self.runtime.adapters.get(adapter_id)
            if loaded is None or ref() is not loaded or bool(loaded.fused) != fused:
                del self._cached_versions[adapter_id]
                if self.prefix_cache is not None:
                    self.prefix_cache.drop_adapter(adapter_id)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then decode one token for every running row."""
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for parked in self.parked.values():
            parked.prune()
        self.forget_changed_adapters()
        self._drop_finished()
        admitted = self._take_admissible()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:
                # Rows that never reached `running` are in no list `fail_all` sees: fail them here, or their
                # callers would wait until their timeout.
                for s in (s for p in admitted for s in p.seqs):
                    if s not in self.running:
                        s.finish_reason = "error"
                        s.emit(exc)
                raise
        if self.running:
            self._decode_step()
        self._drop_finished()  # finished rows leave now, not at the next step

    def _take_admissible(self) -> list[_Prompt]:
        """Waiting requests that fit, grouped by (adapter, prompt); the budget counts tokens to compute."""
        prompts: dict[tuple[str | None, tuple[int, ...]], _Prompt] = {}
        taken = 0
        budget = self.prefill_token_budget
        while self.waiting and len(self.running) + taken < self.max_batch_size:
            request = self.waiting[0].request
            if request.adapter_id in self.parked:  # its weights are swapped out: held until they are back
                self.parked[request.adapter_id].waiting.append(self.waiting.popleft())
                continue
            key = (request.adapter_id, tuple(request.prompt_ids))
            prompt = prompts.get(key)
            if prompt is None and request.adapter_id is not None and request.adapter_id not in self.runtime.adapters:
                self.waiting.popleft().emit(AdapterNotFoundError(request.adapter_id))  # only this request fails
                continue
            if prompt is None:
                blocks = self._match(request.adapter_id, request.prompt_ids)
                prompt = _Prompt(request.adapter_id, request.prompt_ids, blocks)
                cost = len(request.prompt_ids) - prompt.cached
                if taken and cost > budget:
                    break
                budget -= cost
                prompts[key] = prompt
            prompt.seqs.append(self.waiting.popleft())
            taken += 1
        return list(prompts.values())

    def _match(self, adapter_id: str | None, prompt_ids: list[int]) -> list[PrefixBlock]:
        return [] if self.prefix_cache is None else self.prefix_cache.match(adapter_id, prompt_ids)

    def _prefill(self, prompts: list[_Prompt]) -> None:
        """One forward for the distinct prompts (each on its cached prefix), then one batch row per request."""
        order = grouped_order([p.adapter_id for p in prompts])  # each adapter's prompts adjacent, as in decode
        if order is not None:
            prompts = [prompts[i] for i in order]
        seqs = [s for p in prompts for s in p.seqs]
        cached = [p.cached for p in prompts]
        rest = [len(p.prompt_ids) - c for p, c in zip(prompts, cached, strict=True)]
        width_cached, width = max(cached), max(rest)
        # Row g: [pad | cached[g] | pad | rest[g]] over width_cached + width columns.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)  # (G, R)
        mask = torch.zeros((len(prompts), width_cached + width), dtype=torch.long, device=self.device)  # (G, C+R)
        for g, p in enumerate(prompts):
            ids[g, width - rest[g]:] = torch.tensor(p.prompt_ids[cached[g]:], device=self.device)
            mask[g, width_cached - cached[g]:width_cached] = 1
            mask[g, mask.shape[1] - rest[g]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width_cached:]  # (G, R)
        cache = self._cached_past(prompts, width_cached, width)
        for s in seqs:
            s.generator = row_generator(s.request.params, self.device)
        with self.runtime.route([p.adapter_id for p in prompts]):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **self._last_logits_only,
            ).logits[:, -1, :]
        self.prefill_rows += len(prompts)
        self._remember(prompts, cache, mask.shape[1], rest)
        next_pos = positions[:, -1] + 1
        copies = [g for g, p in enumerate(prompts) for _ in p.seqs]  # each request's prompt row
        if len(copies) > len(prompts):  # n > 1: copies take the rows of their prompt's one prefill
            index = torch.tensor(copies, dtype=torch.long, device=self.device)
            mask = kv_cache.select_rows(cache, mask, index)
            logits, next_pos = logits[index], next_pos[index]
        at = self._join(seqs, cache, mask, next_pos, torch.full_like(next_pos, self.pad_id))
        self._last[at] = self._sample(seqs, logits)  # counted as running before their first token is reported

    def _join(self, seqs: list[Sequence], cache: kv_cache.GrowingCache, mask: torch.Tensor, next_pos: torch.Tensor,
              last: torch.Tensor) -> torch.Tensor:
        """Add rows (with their keys/values, mask, next positions and last tokens) to the running batch, each beside
        the running rows of its adapter (one copy of the cache, the merge's); returns their positions in it."""
        rows = [*self.running, *seqs]
        ids = [s.request.adapter_id for s in rows]
        order = grouped_order(ids, self._group_key(ids))
        index = None if order is None else torch.tensor(order, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask, self._next_pos, self._last = cache, mask, next_pos, last
            if index is not None:
                self._mask = kv_cache.select_rows(self._cache, self._mask, index)
        else:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, cache, mask, order)
            self._next_pos = torch.cat([self._next_pos, next_pos])
            self._last = torch.cat([self._last, last])
        at = list(range(len(rows)))  # each row's position in the batch after the join
        if order is not None:
            self._next_pos, self._last = self._next_pos[index], self._last[index]
            for position, row in enumerate(order):
                at[row] = position
        self.running = [rows[i] for i in order] if order is not None else rows
        return torch.tensor(at[len(rows) - len(seqs):], dtype=torch.long, device=self.device)

    def _group_key(self, ids: list[str | None]) -> Callable[[str | None], tuple]:
        """Where an adapter's rows go in the batch: by descending rank (the stack's own order), then target
        modules, then row count, base rows last. Adapters of one rank on the same modules with as many rows then
        sit side by side in the batch and in the stack, and the stacked LoRA path applies each such run of them
        with two batched matmuls (`lora/stacked.py`, `_blocks`)."""
        counts = Counter(ids)

        def key(adapter_id: str | None) -> tuple:
            loaded = self.runtime.adapters.get(adapter_id) if adapter_id is not None else None
            if loaded is None:
                return (1,)
            return (0, -loaded.rank, tuple(sorted(loaded.modules)), -counts[adapter_id])
        return key

    def _cached_past(self, prompts: list[_Prompt], width_cached: int, width: int) -> kv_cache.GrowingCache:
        """A cache holding each prompt's cached blocks right-aligned in the first `width_cached` columns (zeros
        elsewhere: masked, and never NaN), with room for the `width` columns the prefill adds."""
        if width_cached == 0:
            return kv_cache.GrowingCache()
        first = next(p.blocks[0].kv for p in prompts if p.blocks)  # (layers, 2, heads, block, head_dim)
        n_layers, _, heads, _, head_dim = first.shape
        buf = first.new_zeros((n_layers, 2, len(prompts), heads, width_cached + width + kv_cache.SPARE_COLUMNS,
                               head_dim))
        for g, p in enumerate(prompts):
            if p.blocks:
                kv = torch.cat([b.kv for b in p.blocks], dim=3)  # (layers, 2, heads, cached, head_dim)
                buf[:, :, g, :, width_cached - kv.shape[3]:width_cached] = kv
        return kv_cache.prefilled([buf[i, 0] for i in range(n_layers)], [buf[i, 1] for i in range(n_layers)],
                                  width_cached)

    def _remember(self, prompts: list[_Prompt], cache: kv_cache.GrowingCache, length: int, rest: list[int]) -> None:
        """Put each prompt's newly computed full blocks into the prefix cache."""
        if self.prefix_cache is None:
            return
        for g, p in enumerate(prompts):
            self.prefix_cache.count(p.cached)
            start = length - rest[g] - p.cached  # column of the prompt's token 0 (were it all in this cache)

            def kv_of(first: int, stop: int, g: int = g, start: int = start) -> torch.Tensor:
                return torch.stack([torch.stack([layer.keys[g, :, start + first:start + stop],
                                                 layer.values[g, :, start + first:start + stop]])
                                    for layer in cache.layers])  # (layers, 2, heads, stop - first, head_dim)

            self.prefix_cache.insert(p.adapter_id, p.prompt_ids, p.blocks, kv_of)
            if p.adapter_id is not None and p.adapter_id in self.runtime.adapters:
                loaded = self.runtime.adapters[p.adapter_id]
                self._cached_versions[p.adapter_id] = (weakref.ref(loaded), bool(loaded.fused))

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
        greedy = greedy_tokens(scores).tolist()
        finite = finite_rows(logits)
        for i, s in enumerate(seqs):
            if s.finish_reason is not None or s.cancelled:
                continue
            params = s.request.params
            if not finite[i]:
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
        if len(keep) < len(self.running):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Only rows `keep` of the running batch stay (the cache drops the others' keys/values)."""
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next_pos = self._last = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._mask = kv_cache.select_rows(self._cache, self._mask, index)
        self._next_pos, self._last = self._next_pos[index], self._last[index]

    # ---- parking (between steps, on the engine thread) ------------------------------------------------------

    @property
    def parked_requests(self) -> int:
        """Requests held while their adapter is swapped out; read from any thread (the values are copied first,
        in one step under the GIL, as the engine thread may add or pop an adapter meanwhile)."""
        return sum(len(p) for p in list(self.parked.values()))

    def park(self, adapter_id: str) -> int:
        """Take the adapter's requests out of the batch, each row keeping its state, until `unpark`; its weights
        may be detached meanwhile. Requests for it that arrive while it is parked are held too. Returns how many
        requests it has parked."""
        self._drop_finished()
        parked = self.parked.setdefault(adapter_id, ParkedRows())
        rows = [i for i, s in enumerate(self.running) if s.request.adapter_id == adapter_id]
        if rows:
            assert self._cache is not None and self._mask is not None
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            cache, mask = kv_cache.take_rows(self._cache, self._mask, index)
            parked.add([self.running[i] for i in rows], cache, mask, self._next_pos[index], self._last[index])
            taken = set(rows)
            self._keep_rows([i for i in range(len(self.running)) if i not in taken])
        parked.waiting += [s for s in self.waiting if s.request.adapter_id == adapter_id]
        self.waiting = deque(s for s in self.waiting if s.request.adapter_id != adapter_id)
        return len(parked)

    def unpark(self, adapter_id: str) -> int:
        """Put the adapter's parked requests back once its weights are attached (else a no-op): rows re-join the
        batch through the left-padded merge a prefill uses (the batch may exceed max_batch_size until rows
        finish: their keys/values were held all along); the others wait again, ahead of later arrivals.
        Returns how many requests it has put back."""
        if adapter_id not in self.runtime.adapters or adapter_id not in self.parked:
            return 0
        parked = self.parked.pop(adapter_id)
        parked.prune()
        if parked.rows:
            assert parked.cache is not None and parked.mask is not None
            self._join(parked.rows, parked.cache, parked.mask, parked.next_pos, parked.last)
        self.waiting.extendleft(reversed(parked.waiting))
        return len(parked)

    def unpark_attached(self) -> None:
        """Unpark every parked adapter whose weights are attached (the engine calls this after each adapter
        change, so requests resume in the same pause as their adapter's attach)."""
        for adapter_id in [a for a in self.parked if a in self.runtime.adapters]:
            self.unpark(adapter_id)

    def fail_parked(self, adapter_id: str, exc: BaseException) -> int:
        """The adapter's parked requests end with `exc` (its weights will not come back); how many there were."""
        parked = self.parked.pop(adapter_id, None)
        for s in parked.all() if parked is not None else ():
            s.finish_reason = s.finish_reason or "error"
            s.emit(exc)
        return 0 if parked is None else len(parked)

    def fail_all(self, exc: BaseException) -> None:
        """A step raised: every request in flight (parked ones too) gets the error, and the batch starts empty."""
        for s in (*self.running, *self.waiting, *(s for p in self.parked.values() for s in p.all())):
            s.finish_reason = s.finish_reason or "error"
            s.emit(exc)
        self.running, self.waiting, self.parked = [], deque(), {}
        self._cache = self._mask = self._next_pos = self._last = None


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of (B, V) logits is all finite. A NaN or an infinity makes its row's sum non-finite: one
    reduction instead of a (B, V) isfinite map (3 ms of a 60 ms CPU step at V = 32000); finite logits that
    overflow the sum are told apart by the exact check."""
    rows = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32)).tolist()
    return rows if all(rows) else torch.isfinite(logits).all(dim=-1).tolist()
