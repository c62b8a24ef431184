"""`TranslationDataModule`: the prepared corpus (see pipeline.py) served as token-bucketed batches.

Batches (see batching.collate_pairs): `src` [B, S] source ids + EOS, `src_lengths` [B], `tgt` [B, T]
BOS + target ids + EOS, `index` [B] position of each pair in its split, all right-padded with PAD_ID.

The train loader is a torchdata `StatefulDataLoader` over a `TokenBatchSampler`, so Lightning checkpoints
its position and a resumed run continues mid-epoch exactly. The sampler shards batches across DDP ranks
itself, so the Trainer must run with `use_distributed_sampler=False` (Lightning cannot inject its
DistributedSampler into a custom batch sampler and raises if asked to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nmt_moe.data.batching import TokenBatchSampler, collate_pairs, padding_fraction
from nmt_moe.data.columns import read_lengths
from nmt_moe.data.pipeline import PipelineConfig, PreparedData, prepare
from nmt_moe.data.tokenizer import Tokenizer

EVAL_SPLITS = ("valid", "test")


class EncodedSplit(torch.utils.data.Dataset):
    """Map-style view of an encoded split; `__getitems__` reads a whole batch from Arrow in one call."""

    def __init__(self, ds: datasets.Dataset) -> None:
        self.ds = ds.select_columns(["src_ids", "tgt_ids"])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = self.ds[indices]
        return [
            {"src_ids": s, "tgt_ids": t, "index": i}
            for s, t, i in zip(rows["src_ids"], rows["tgt_ids"], indices, strict=True)
        ]


class TranslationDataModule(pl.LightningDataModule):
    """Local files or a hub WMT set, cleaned, SentencePiece-encoded, cached, and batched by token budget.

    Args:
        pipeline: what the prepared data is made of (corpora, languages, SentencePiece, cleaning): every
            setting that changes it, documented in `PipelineConfig`; they form the cache key.
        cache_dir: where prepared data lives (default $NMT_MOE_CACHE or ~/.cache/nmt_moe).
        max_tokens: training batch budget, batch size times the longer side's padded length.
        eval_max_tokens: the same for valid/test (default: max_tokens).
        max_valid_sentences: use only the first N validation pairs (keeps validation cheap).
        seed: batch shuffling seed; each epoch reshuffles from (seed, epoch).
        num_workers: DataLoader worker processes.
        num_proc: processes for `datasets.map` during preparation.
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        cache_dir: str | None = None,
        max_tokens: int = 4096,
        eval_max_tokens: int | None = None,
        max_valid_sentences: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(pipeline, Mapping):  # hyper-parameters given back as saved
            pipeline = PipelineConfig(**pipeline)
        longest = pipeline.cleaning.max_tokens_per_sentence
        if longest is not None and max_tokens < longest:
            raise ValueError(
                f"max_tokens={max_tokens} cannot hold a pair of max_tokens_per_sentence={longest}"
            )
        self.save_hyperparameters(ignore=["pipeline"])
        self.hparams["pipeline"] = dataclasses.asdict(pipeline)  # primitives: checkpoints load weights_only
        self.config = pipeline
        self.vocab_size = pipeline.vocab_size
        self.cache_dir = cache_dir
        self.max_tokens = max_tokens
        self.eval_max_tokens = eval_max_tokens or max_tokens
        self.max_valid_sentences = max_valid_sentences
        self.seed = seed
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.prepared: PreparedData | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self._lengths: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (src [N], tgt [N])

    # -- Lightning hooks -------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Runs once per node before setup: builds the cache (finds it when it exists)."""
        self.prepared = prepare(self.config, self.cache_dir, self.num_proc)

    def setup(self, stage: str | None = None) -> None:
        """Loads the prepared splits; under DDP, ranks that skipped prepare_data find the cache here."""
        if self.splits:
            return
        if self.prepared is None:
            self.prepared = prepare(self.config, self.cache_dir, self.num_proc)
        self.src_tokenizer: Tokenizer = self.prepared.src_tokenizer
        self.tokenizer: Tokenizer = (
            self.prepared.tgt_tokenizer if not self.config.joint_vocab else self.src_tokenizer
        )
        for split in ("train", *EVAL_SPLITS):
            ds = self.prepared.split(split)
            if ds is None:
                continue
            if split == "valid" and self.max_valid_sentences is not None:
                ds = ds.select(range(min(self.max_valid_sentences, len(ds))))
            self.splits[split] = ds

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", self.max_tokens, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("valid", self.eval_max_tokens, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", self.eval_max_tokens, shuffle=False)

    # -- public helpers --------------------------------------------------------------------------------

    def references(self, split: str) -> list[str]:
        """Cleaned target sentences of "valid"/"test" in dataset order: `references(s)[batch["index"][i]]`."""
        return self._text(split, "tgt")

    def sources(self, split: str) -> list[str]:
        """Cleaned source sentences of "valid"/"test" in dataset order."""
        return self._text(split, "src")

    def batch_sampler(
        self, split: str, *, shuffle: bool, max_tokens: int | None = None, all_ranks: bool = False
    ) -> TokenBatchSampler:
        """The sampler a loader uses for `split`: this rank's share, or the whole epoch with `all_ranks`."""
        rank, world = (0, 1) if all_ranks else self._rank_and_world()
        src_len, tgt_len = self.lengths(split)
        budget = max_tokens or (self.max_tokens if split == "train" else self.eval_max_tokens)
        return TokenBatchSampler(
            src_len,
            tgt_len,
            budget,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            allow_oversize=split != "train",  # evaluation keeps every pair; an over-long one goes alone
        )

    def padding_fraction(self, split: str = "train") -> float:
        """Share of PAD in the src+tgt tensors of one epoch of `split`'s batches (all ranks)."""
        src_len, tgt_len = self.lengths(split)
        sampler = self.batch_sampler(split, shuffle=split == "train", all_ranks=True)
        return padding_fraction(sampler.batches(), src_len, tgt_len)

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Token counts (src [N], tgt [N]) of `split`, read once as whole Arrow columns."""
        if split not in self._lengths:
            self._lengths[split] = read_lengths(self._split(split))
        return self._lengths[split]

    # -- internals -------------------------------------------------------------------------------------

    def _split(self, split: str) -> datasets.Dataset:
        if not self.splits:
            raise RuntimeError("call setup() (or let the Trainer call it) before asking for data")
        if split not in self.splits:
            raise KeyError(f"no {split!r} split: give it as local files or use a hub dataset that has it")
        return self.splits[split]

    def _text(self, split: str, column: str) -> list[str]:
        if split not in EVAL_SPLITS:
            raise ValueError(f"text is kept for {EVAL_SPLITS} only, not {split!r}")
        return list(self._split(split)[column])

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, split: str, max_tokens: int, *, shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(
            EncodedSplit(self._split(split)),
            batch_sampler=self.batch_sampler(split, shuffle=shuffle, max_tokens=max_tokens),
            collate_fn=collate_pairs,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
