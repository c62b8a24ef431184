"""Token-budget batches: length-bucketed, seeded, split across DDP ranks, resumable mid-epoch.

Budget rule: a batch of B pairs costs B * max(longest source, longest target) tokens, lengths as in the
batch tensors (source + EOS, BOS + target + EOS), i.e. the padded size of the larger of the two tensors.
No batch exceeds `max_tokens`; a single pair longer than the budget is an error (training) or gets a
batch of its own (evaluation, `allow_oversize=True`), never truncated.

Every rank gets the same number of batches without dropping or repeating pairs: when the batch count does
not divide by the world size, the largest batches are split in two until it does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from nmt_moe.data.tokenizer import PAD_ID


def bucket_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    max_tokens: int,
    rng: np.random.Generator | None = None,
    allow_oversize: bool = False,
) -> list[np.ndarray]:
    """Pack pair indices into batches of similar length under the token budget.

    Pairs are sorted by (source length, target length), ties broken at random when `rng` is given, so
    both tensors of a batch need little padding and batch contents vary between epochs. Batch order is
    shuffled with `rng` (kept in length order without it). A pair longer than `max_tokens` raises,
    or with `allow_oversize` forms a batch alone.
    """
    src_lengths = np.asarray(src_lengths, dtype=np.int64)
    tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64)
    if src_lengths.shape != tgt_lengths.shape:
        raise ValueError(
            f"src_lengths {src_lengths.shape} and tgt_lengths {tgt_lengths.shape} differ in shape"
        )
    longest = np.maximum(src_lengths, tgt_lengths)
    if len(longest) and longest.max() > max_tokens and not allow_oversize:
        bad = int(longest.argmax())
        raise ValueError(
            f"pair {bad} has {int(longest[bad])} tokens, more than max_tokens={max_tokens}; raise max_tokens "
            "or lower max_tokens_per_sentence"
        )
    tiebreak = rng.permutation(len(longest)) if rng is not None else np.arange(len(longest))
    order = _length_order(src_lengths, tgt_lengths, tiebreak)  # [N] pair indices in length order
    ends = _batch_ends(longest[order], max_tokens)
    batches = np.split(order, ends[:-1]) if len(order) else []
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _length_order(src: np.ndarray, tgt: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices sorted by (src, tgt, tiebreak), as `np.lexsort`; when the three fit in 63 bits, one
    argsort of a packed int64 key (unique, since tiebreak is a permutation) instead of three sort passes."""
    bits = max(1, int(len(src) - 1).bit_length())  # for tiebreak values 0..N-1
    if len(src) and src.min() >= 0 and tgt.min() >= 0 and max(src.max(), tgt.max()) < 1 << 16 and bits <= 31:
        return np.argsort((src << (16 + bits)) | (tgt << bits) | tiebreak)
    return np.lexsort((tiebreak, tgt, src))


def _batch_ends(widths: np.ndarray, max_tokens: int) -> np.ndarray:
    """End positions of greedy batches over `widths` [N] (longer side per pair, in batch order).

    Same cut as a pair-by-pair loop (a batch grows while size * widest <= max_tokens; its first pair
    always joins), but one numpy step per batch: a batch starting at width w holds at most
    max_tokens // w pairs, so the next cut lies within that many + 1 positions.
    """
    ends, start, n = [], 0, len(widths)
    while start < n:
        window = min(n - start, max(1, max_tokens // max(1, int(widths[start]))) + 1)
        widest = np.maximum.accumulate(widths[start : start + window])  # [window]
        cost = widest * np.arange(1, window + 1)  # nondecreasing: padded tokens of each prefix
        start += max(1, int(np.searchsorted(cost, max_tokens, side="right")))
        ends.append(start)
    return np.asarray(ends, dtype=np.int64)


def split_for_ranks(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Split the largest batches in two until the count divides by `world_size` (order otherwise kept)."""
    batches = list(batches)
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i])) if batches else None
        if largest is None or len(batches[largest]) < 2:
            raise ValueError(
                f"{sum(map(len, batches))} pairs cannot fill an equal number of batches on {world_size} ranks"
            )
        batch = batches[largest]
        half = len(batch) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches


def padding_fraction(
    batches: Sequence[np.ndarray], src_lengths: np.ndarray, tgt_lengths: np.ndarray
) -> float:
    """Share of PAD positions in the source and target tensors of these batches together (vectorised)."""
    batches = [batch for batch in batches if len(batch)]
    if not batches:
        return 0.0
    sizes = np.array([len(batch) for batch in batches], dtype=np.int64)  # [n_batches]
    flat = np.concatenate(batches)  # [pairs]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # [n_batches] first position of each batch
    src = np.asarray(src_lengths, dtype=np.int64)[flat]
    tgt = np.asarray(tgt_lengths, dtype=np.int64)[flat]
    widest = np.maximum.reduceat(src, starts) + np.maximum.reduceat(tgt, starts)  # [n_batches]
    real, padded = int(src.sum() + tgt.sum()), int((sizes * widest).sum())
    return 1.0 - real / padded if padded else 0.0


class TokenBatchSampler(Sampler[list[int]]):
    """Batch sampler over one split: this rank's share of the epoch's token-bucketed batches.

    Every rank builds the same epoch plan from (seed, epoch) and takes batches rank, rank + W, ... .
    `state_dict()` records the epoch and the batches already handed out, so a `StatefulDataLoader`
    (which saves it with the loader's state) resumes mid-epoch without repeating or skipping a batch.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        allow_oversize: bool = False,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.allow_oversize = allow_oversize
        self.epoch = 0
        self._resume_at = 0  # batches of this epoch already consumed before a restore
        self._yielded = 0
        self._plan: tuple[int, list[np.ndarray]] | None = None
        # Lightning calls `set_epoch` on `loader.sampler` and `loader.batch_sampler.sampler`, never on the
        # batch sampler itself: expose ourselves there so each epoch reshuffles.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; a new epoch reshuffles and drops any resume point."""
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch, in order (computed once per epoch)."""
        if self._plan is None or self._plan[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
            everyone = bucket_batches(
                self.src_lengths, self.tgt_lengths, self.max_tokens, rng, self.allow_oversize
            )
            everyone = split_for_ranks(everyone, self.world_size)
            self._plan = (self.epoch, everyone[self.rank :: self.world_size])
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.batches())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "yielded": self._yielded,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"cannot resume mid-epoch: saved with seed={state['seed']} world_size={state['world_size']}, "
                f"now seed={self.seed} world_size={self.world_size}"
            )
        self.epoch = state["epoch"]
        self._resume_at = self._yielded = state["yielded"]


def make_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int) -> list[list[int]]:
    """Indices of the non-empty id lists (decoding, scoring), longest first, grouped so that
    batch size * longest <= max_tokens; a list longer than the budget gets a batch of its own."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        # the first index of a batch is its longest source
        if (
            current
            and len(current) < max_sentences
            and (len(current) + 1) * lengths[current[0]] <= max_tokens
        ):
            current.append(index)
        else:
            batches.append([index])
    return batches


def pad_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token id lists right-padded with PAD_ID into one [B, max length] long tensor: the one padding rule
    of training batches, decoding, scoring and routing."""
    tensors = [torch.as_tensor(row, dtype=torch.long) for row in rows]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=PAD_ID)


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad encoded pairs into the batch format: src [B, S], src_lengths [B], tgt [B, T], index [B]."""
    return {
        "src": pad_ids([item["src_ids"] for item in items]),  # [B, S]
        "src_lengths": torch.tensor([len(item["src_ids"]) for item in items], dtype=torch.long),  # [B]
        "tgt": pad_ids([item["tgt_ids"] for item in items]),  # [B, T]
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # [B]
    }
