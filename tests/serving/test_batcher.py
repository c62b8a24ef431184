"""The serving worker without HTTP: requests mixed into one search get what each line gets alone."""

from __future__ import annotations

import random
from concurrent.futures import wait

from helpers.tiny_models import tiny_corpus
from helpers.tiny_trained import trained_tiny_model

from nmt_moe.data.text_io import encode_sources
from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.translate import translate_lines
from nmt_moe.serving.batcher import DynamicBatcher, Settings


def test_mixed_requests_equal_each_line_translated_alone() -> None:
    model, tokenizer = trained_tiny_model()
    pool = [*tiny_corpus(30, seed=21), ""]
    base = DecodeOptions(beam_size=5)
    # a long wait and a large budget: every request below lands in the same gather
    batcher = DynamicBatcher(model, tokenizer, base, batch_tokens=10**6, max_wait_s=0.5, max_sentences=64)
    rng = random.Random(0)
    jobs = []
    for _ in range(12):
        lines = [rng.choice(pool) for _ in range(rng.randint(1, 5))]
        settings = rng.choice([Settings(5, 1), Settings(1, 1), Settings(4, 2)])
        sources = encode_sources(lines, tokenizer, max_input_tokens=64)
        jobs.append((lines, settings, batcher.submit(sources, settings)))
    batcher.start()
    wait([future for *_, future in jobs], timeout=300)
    batcher.close()
    assert batcher.stats.gathers == 1 and batcher.stats.searches == 3  # one gather, one search per setting
    for lines, settings, future in jobs:
        options = DecodeOptions(beam_size=settings.beam, nbest=settings.nbest)
        for line, got in zip(lines, future.result(), strict=True):
            alone = translate_lines(model, tokenizer, [line], options, max_sentences=1)[0]
            texts = tokenizer.decode([h.tokens for h in alone]) if alone else [""]
            assert got == texts


def test_a_failing_search_fails_its_requests_and_the_worker_goes_on() -> None:
    model, tokenizer = trained_tiny_model()
    batcher = DynamicBatcher(model, tokenizer, DecodeOptions(), max_wait_s=0.0)
    batcher.start()
    try:
        bad = batcher.submit([[10**6, 3]], Settings(5, 1))  # a token id outside the vocabulary
        assert bad.exception(timeout=60) is not None
        good = batcher.submit(encode_sources(["a red ball"], tokenizer, max_input_tokens=64), Settings(5, 1))
        assert len(good.result(timeout=60)) == 1 and batcher.alive
    finally:
        batcher.close()
