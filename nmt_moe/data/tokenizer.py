"""SentencePiece tokenizer with fixed special ids, trainable from an iterator of sentences.

The ids of pad/unk/bos/eos are fixed (0-3) so that models, decoders and checkpoints agree on them without
reading the tokenizer. The model travels as its serialized proto bytes, so a checkpoint alone can rebuild it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import itertools
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")


def lang_token(lang: str) -> str:
    """The tag that asks a multilingual model for target language `lang`, e.g. `<2de>`."""
    return f"<2{lang}>"


class Tokenizer:
    """A loaded SentencePiece model; encodes and decodes batches of sentences."""

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self.sp = processor
        specials = {
            "pad": (processor.pad_id(), PAD_ID),
            "unk": (processor.unk_id(), UNK_ID),
            "bos": (processor.bos_id(), BOS_ID),
            "eos": (processor.eos_id(), EOS_ID),
        }
        wrong = {name: got for name, (got, want) in specials.items() if got != want}
        if wrong:
            raise ValueError(
                f"SentencePiece model has special ids {wrong}; nmt-moe needs pad=0 unk=1 bos=2 eos=3 "
                "(train it with train_tokenizer)"
            )

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        return cls(spm.SentencePieceProcessor(model_proto=model_proto))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        return cls.from_bytes(path.read_bytes())

    def to_bytes(self) -> bytes:
        return self.sp.serialized_model_proto()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    # Pickling via the proto lets `datasets.map(num_proc=...)` ship the tokenizer to worker processes.
    def __getstate__(self) -> bytes:
        return self.to_bytes()

    def __setstate__(self, state: bytes) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=state)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, sentences: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Piece ids per sentence, without BOS/EOS (the batch format adds those)."""
        return self.sp.encode(list(sentences), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text per id list; pad/bos/eos are control symbols and decode to nothing."""
        return self.sp.decode([list(map(int, x)) for x in ids])

    def token_id(self, piece: str) -> int:
        """Id of a piece that must exist (e.g. a `<2xx>` language tag); KeyError if it does not."""
        index = self.sp.piece_to_id(piece)
        if index == UNK_ID and piece != self.sp.id_to_piece(UNK_ID):
            raise KeyError(f"piece {piece!r} is not in the SentencePiece vocabulary")
        return index


def default_threads() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reservoir_sample(sentences: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of `size` sentences (all of them when fewer), in one pass and O(size) memory.

    Algorithm L (Li, 1994): after the reservoir fills, it jumps geometrically distributed gaps instead
    of drawing a number per sentence, so a long stream costs few random draws.
    """
    rng = random.Random(seed)
    stream = iter(sentences)
    reservoir = list(itertools.islice(stream, size))
    if len(reservoir) < size:
        return reservoir
    weight = math.exp(math.log(rng.random()) / size)
    while True:
        skip = math.floor(math.log(rng.random()) / math.log(1.0 - weight))
        picked = next(itertools.islice(stream, skip, None), None)
        if picked is None:
            return reservoir
        reservoir[rng.randrange(size)] = picked
        weight *= math.exp(math.log(rng.random()) / size)


def _drain(sentences: list[str]) -> Iterator[str]:
    """Yield and release the sentences in order, so the Python copy shrinks as SentencePiece copies them."""
    sentences.reverse()
    while sentences:
        yield sentences.pop()


def train_tokenizer(
    sentences: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    user_defined_symbols: Sequence[str] = (),
    input_sentence_size: int = 1_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece model in memory with the fixed special ids.

    `input_sentence_size` caps how many sentences SentencePiece trains on (0: no cap), so a WMT-sized
    corpus trains in bounded memory. The cap is applied here by a reservoir sample seeded with `seed`, not by
    SentencePiece: its own sampler ignores `set_random_generator_seed` (0.2.3 drew another sample in
    every process), so the same sentences and settings give a byte-identical model only this way.
    `num_threads` defaults to the machine's cores. A vocab the data cannot fill raises a ValueError
    naming both sizes, since SentencePiece's own message is an internal assertion.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"spm model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if vocab_size <= 4 + len(user_defined_symbols):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the special and user symbols")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"spm num_threads must be >= 1, got {num_threads}")
    if input_sentence_size < 0:
        raise ValueError(f"input_sentence_size must be >= 0 (0: every sentence), got {input_sentence_size}")
    if input_sentence_size:
        sample = _drain(reservoir_sample(sentences, input_sentence_size, seed))
    else:
        sample = iter(sentences)  # streamed: a caller that drew its own sample holds no copy of it here
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,  # all of `sample`: SentencePiece's own draw is unseeded
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads or default_threads(),
            minloglevel=2,
        )
    except RuntimeError as error:
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(error))
        if too_high:
            raise ValueError(
                f"vocab_size {too_high[1]} is too large for this training data: SentencePiece can build at "
                f"most {too_high[2]} pieces from it; lower vocab_size or add data"
            ) from error
        raise
    finally:
        release_freed_memory()
    return Tokenizer.from_bytes(model.getvalue())


def release_freed_memory() -> None:
    """Return freed heap to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    SentencePiece frees its training memory (about 1 GB after a 1M-sentence unigram run) to malloc,
    which keeps most of it; without a trim that stays in RSS, and `datasets.map` workers forked
    afterwards each count it again.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
