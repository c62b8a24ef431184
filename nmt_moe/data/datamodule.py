"""`TranslationDataModule`: the prepared corpus (see pipeline.py) served as token-bucketed batches.

Batches (see batching.collate_pairs): `src` [B, S] source ids + EOS, `src_lengths` [B], `tgt` [B, T]
BOS + target ids + EOS, `index` [B] position of each pair in its split, all right-padded with PAD_ID.

The train loader is a torchdata `StatefulDataLoader` over a `TokenBatchSampler`, so Lightning checkpoints
its position and a resumed run continues mid-epoch exactly. The sampler shards batches across DDP ranks
itself, so the Trainer must run with `use_distributed_sampler=False` (Lightning cannot inject its
DistributedSampler into a custom batch sampler and raises if asked to).
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nmt_moe.data.batching import TokenBatchSampler, collate_pairs, padding_fraction
from nmt_moe.data.cleaning import CleaningConfig
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
        src_lang, tgt_lang: language codes; file suffixes for local prefixes, keys for JSONL and hub rows.
            A list of target languages trains one multilingual model (one-to-many, local files only):
            every corpus is read once per target language (`train.en` + `train.de`, `train.en` +
            `train.fr`, ...), each source tagged `<2xx>`, splits concatenated language after language.
        train: local training corpora (path prefix, .tsv or .jsonl); several are concatenated.
        valid, test: local evaluation corpora; where absent and `hub_dataset` is set, the hub's splits.
        hub_dataset, hub_config: e.g. "wmt/wmt14" and "de-en".
        cache_dir: where prepared data lives (default $NMT_MOE_CACHE or ~/.cache/nmt_moe).
        vocab_size, spm_model_type, character_coverage, byte_fallback, joint_vocab: SentencePiece settings
            (joint_vocab=False trains one model per side, both of vocab_size pieces).
        spm_input_sentence_size: sentences SentencePiece trains on, drawn at random (seeded) from
            larger corpora without reading the rest; 0 uses every sentence.
        spm_seed: seeds that draw, so the same data and settings give a byte-identical tokenizer.
        spm_num_threads: SentencePiece threads (default: the machine's cores); the model depends on
            it, so it is part of the cache key; fix it to share vocabularies across machines.
        content_key: find the cache by the corpus files' bytes rather than their paths and mtimes, so
            a copied corpus is found (costs one read of the files per run).
        normalize_whitespace, drop_empty, dedup, max_tokens_per_sentence, max_length_ratio: training-set
            cleaning; lengths count tokens as in the batch tensors (with BOS/EOS).
        target_lang_token: prepend `<2{tgt_lang}>` to every source (reserved as a SentencePiece symbol).
        max_tokens: training batch budget, batch size times the longer side's padded length.
        eval_max_tokens: the same for valid/test (default: max_tokens).
        max_valid_sentences: use only the first N validation pairs (keeps validation cheap).
        seed: batch shuffling seed; each epoch reshuffles from (seed, epoch).
        num_workers: DataLoader worker processes.
        num_proc: processes for `datasets.map` during preparation.
    """

    def __init__(
        self,
        src_lang: str,
        tgt_lang: str | list[str],
        train: str | list[str] | None = None,
        valid: str | None = None,
        test: str | None = None,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        cache_dir: str | None = None,
        vocab_size: int = 8000,
        spm_model_type: str = "unigram",
        character_coverage: float = 1.0,
        byte_fallback: bool = False,
        joint_vocab: bool = True,
        spm_input_sentence_size: int = 1_000_000,
        spm_seed: int = 0,
        spm_num_threads: int | None = None,
        content_key: bool = False,
        normalize_whitespace: bool = True,
        drop_empty: bool = True,
        dedup: bool = False,
        max_tokens_per_sentence: int | None = 256,
        max_length_ratio: float | None = None,
        target_lang_token: bool = False,
        max_tokens: int = 4096,
        eval_max_tokens: int | None = None,
        max_valid_sentences: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = PipelineConfig(
            src_lang=src_lang,
            tgt_lang=tgt_lang if isinstance(tgt_lang, str) else tuple(tgt_lang),
            train=tuple([train] if isinstance(train, str) else train or ()),
            valid=valid,
            test=test,
            hub_dataset=hub_dataset,
            hub_config=hub_config,
            vocab_size=vocab_size,
            spm_model_type=spm_model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            joint_vocab=joint_vocab,
            spm_input_sentence_size=spm_input_sentence_size,
            spm_seed=spm_seed,
            spm_num_threads=spm_num_threads,
            content_key=content_key,
            target_lang_token=target_lang_token,
            cleaning=CleaningConfig(
                normalize_whitespace=normalize_whitespace,
                drop_empty=drop_empty,
                dedup=dedup,
                max_tokens_per_sentence=max_tokens_per_sentence,
                max_length_ratio=max_length_ratio,
            ),
        )
        longest = max_tokens_per_sentence
        if longest is not None and max_tokens < longest:
            raise ValueError(
                f"max_tokens={max_tokens} cannot hold a pair of max_tokens_per_sentence={longest}"
            )
        self.vocab_size = vocab_size
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
