"""Keys and values of prompt prefixes, kept per adapter, so a prompt that starts like an earlier one prefills
only the rest (vLLM's automatic prefix caching, on plain tensors).

A prompt is cut into blocks of `BLOCK_TOKENS` tokens. A block is found by (adapter, parent block, its tokens):
a chain of blocks from the prompt's start is a cached prefix, and two prompts share exactly the blocks of
their common full-block prefix. The key holds the tokens themselves and the parent's serial number, not a
hash, so a lookup can never return another prompt's keys/values. Each block holds every layer's keys and
values of its tokens in one tensor (layers, 2, heads, BLOCK_TOKENS, head_dim).

Keys/values depend on the adapter (it may change k/v projections, embeddings, anything before them), so
blocks are per adapter id (None = base model); the engine drops an adapter's blocks when the adapter's
weights change (delete, unload, re-upload, fuse). Memory is bounded by `max_bytes`: least recently used
blocks go first, and a lookup touches a chain from its end to its start so that a chain's tail goes before
its head (evicting a block also evicts the blocks after it, which nothing could reach any more).

Not thread-safe: only the engine's worker uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Tokens per block: the granularity of sharing (a prefix is reused in whole blocks) and of eviction. vLLM's
# default; small enough that a chat system prompt loses at most 15 tokens, large enough that a 4096-token
# prompt is 256 blocks.
BLOCK_TOKENS = 16

BlockKey = tuple[str | None, int, tuple[int, ...]]  # (adapter id or None, parent serial (0: none), tokens)


@dataclass(eq=False)
class PrefixBlock:
    key: BlockKey
    serial: int
    kv: torch.Tensor  # (layers, 2, heads, BLOCK_TOKENS, head_dim): keys [:, 0], values [:, 1]
    parent: PrefixBlock | None
    children: list[PrefixBlock] = field(default_factory=list)

    @property
    def adapter_id(self) -> str | None:
        return self.key[0]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixCacheStats:
    hits: int = 0  # lookups that reused at least one block
    misses: int = 0  # lookups that reused none
    tokens_saved: int = 0  # prompt tokens not prefilled thanks to reused blocks
    evicted_blocks: int = 0  # blocks dropped for room (not counting an adapter's blocks dropped with it)
    blocks: int = 0  # held now
    bytes: int = 0  # held now


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[BlockKey, PrefixBlock] = OrderedDict()  # least recently used first
        self._serial = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def adapters(self) -> set[str | None]:
        return {b.adapter_id for b in self._blocks.values()}

    def match(self, adapter_id: str | None, prompt_ids: Sequence[int]) -> list[PrefixBlock]:
        """The longest cached chain of blocks `prompt_ids` starts with, leaving at least its last token to
        compute (its logits pick the first new token). Counted by `count` once the prompt is prefilled."""
        chain: list[PrefixBlock] = []
        usable = (len(prompt_ids) - 1) // self.block_tokens
        for i in range(usable):
            block = self._blocks.get(self._key(adapter_id, chain[-1] if chain else None, prompt_ids, i))
            if block is None:
                break
            chain.append(block)
        self._touch(chain)
        return chain

    def count(self, reused_tokens: int) -> None:
        """Count one prefilled prompt: a hit when it reused cached tokens, else a miss."""
        if reused_tokens:
            self.stats.hits += 1
            self.stats.tokens_saved += reused_tokens
        else:
            self.stats.misses += 1

    def insert(self, adapter_id: str | None, prompt_ids: Sequence[int], chain: list[PrefixBlock],
               kv_of: Callable[[int, int], torch.Tensor]) -> None:
        """Add the prompt's full blocks after `chain` (the blocks it was prefilled on). `kv_of(start, stop)`
        gives the keys/values of prompt tokens start..stop as (layers, 2, heads, stop - start, head_dim)."""
        first, full = len(chain), len(prompt_ids) // self.block_tokens
        if first >= full or any(not self._holds(b) for b in chain):
            return
        chain = list(chain)
        new = kv_of(first * self.block_tokens, full * self.block_tokens).split(self.block_tokens, dim=3)
        for i, kv in zip(range(first, full), new, strict=True):
            parent = chain[-1] if chain else None
            key = self._key(adapter_id, parent, prompt_ids, i)
            block = self._blocks.get(key)  # another row of the same prefill may have added it
            if block is None:
                block = PrefixBlock(key, self._next_serial(), kv.clone(), parent)  # clone: not a view of the batch
                if not self._make_room(block.nbytes, chain):
                    break
                self._blocks[key] = block
                if parent is not None:
                    parent.children.append(block)
                self.stats.blocks += 1
                self.stats.bytes += block.nbytes
            chain.append(block)
        self._touch(chain)

    def drop_adapter(self, adapter_id: str | None) -> int:
        """Drop every block of the adapter; returns the bytes freed."""
        before = self.stats.bytes
        for block in [b for b in self._blocks.values() if b.adapter_id == adapter_id]:
            self._remove(block)
        return before - self.stats.bytes

    def clear(self) -> None:
        for block in list(self._blocks.values()):
            self._remove(block)

    # ---- internals -------------------------------------------------------------------------------------------

    def _key(self, adapter_id: str | None, parent: PrefixBlock | None, prompt_ids: Sequence[int], i: int) -> BlockKey:
        tokens = tuple(prompt_ids[i * self.block_tokens:(i + 1) * self.block_tokens])
        return adapter_id, 0 if parent is None else parent.serial, tokens

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _holds(self, block: PrefixBlock) -> bool:
        return self._blocks.get(block.key) is block

    def _touch(self, chain: list[PrefixBlock]) -> None:
        """Most recently used: the chain's head last, so the tail is evicted first."""
        for block in reversed(chain):
            if self._holds(block):
                self._blocks.move_to_end(block.key)

    def _make_room(self, nbytes: int, keep: list[PrefixBlock]) -> bool:
        """Evict least recently used blocks until `nbytes` more fit; False if that would evict `keep`."""
        if nbytes > self.max_bytes:
            return False
        while self.stats.bytes + nbytes > self.max_bytes:
            victim = next(iter(self._blocks.values()))
            if any(victim is b for b in keep):
                return False
            self.stats.evicted_blocks += self._remove(victim)
        return True

    def _remove(self, block: PrefixBlock) -> int:
        """Remove the block and every block after it; returns how many went."""
        if not self._holds(block):
            return 0
        del self._blocks[block.key]
        self.stats.blocks -= 1
        self.stats.bytes -= block.nbytes
        removed = 1
        for child in block.children:
            removed += self._remove(child)
        if block.parent is not None and self._holds(block.parent):
            block.parent.children.remove(block)
        return removed
