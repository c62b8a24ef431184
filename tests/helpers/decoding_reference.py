"""Test-only reference: beam_search exactly as it was before the issue-18 restructure (commit b94f11b).

The property tests (tests/decoding/test_equivalence.py) check that the restructured search returns the same
hypotheses, scores and experts as this one, bit for bit. Do not edit it to follow the new code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nmt_moe.decoding.penalties import coverage_penalty, length_penalty

BOS_ID, EOS_ID = 2, 3  # fixed by the tokenizer contract (nmt_moe.data.tokenizer)


@dataclass
class Hypothesis:
    """One finished translation of one sentence."""

    tokens: list[int]  # target ids, no BOS/EOS
    score: float  # GNMT score used for ranking: log_prob / lp + cp
    log_prob: float  # model log-probability of `tokens` (+ EOS when the hypothesis ended with one)
    # experts[i][l] = expert ids (k of them) that decoder MoE layer l routed the step producing tokens[i] to
    experts: list[list[list[int]]] | None = None


def max_target_lengths(src_lengths: Tensor, max_len_a: float, max_len_b: float) -> Tensor:
    """Per-sentence target length limit int(a * src_len + b), at least 1: [B] -> [B].

    Computed in float32 exactly as greedy_decode does, so both stop at the same step.
    """
    return (max_len_a * src_lengths.float() + max_len_b).long().clamp(min=1)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the search (no dropout, no gate noise), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_options(beam_size: int, nbest: int, alpha: float, beta: float, min_len: int) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and beam_size ({beam_size}), got {nbest}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if min_len < 0:
        raise ValueError(f"min_len must be >= 0, got {min_len}")


# no_grad, not inference_mode: under bf16 autocast, autocast caches the bf16 copy of each weight for the whole
# search only outside inference mode; inside it, every step re-casts the output layer and LSTM weights.
@torch.no_grad()
def reference_beam_search(
    model: Any,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int = 5,
    nbest: int = 1,
    alpha: float = 0.0,
    beta: float = 0.0,
    max_len_a: float = 1.5,
    max_len_b: float = 10,
    min_len: int = 0,
    return_experts: bool = False,
) -> list[list[Hypothesis]]:
    """Translate a batch; returns per sentence its `nbest` best hypotheses, best first.

    model: anything with the Seq2Seq decoding interface (encode / init_state / decode_step);
    src: Long [B, S] source ids + EOS, right-padded; src_lengths: Long [B].
    min_len: EOS is blocked until this many tokens have been generated.
    The model runs in eval mode (MoE gates route without noise, as at the end of training).
    return_experts: also record, per target token, the experts each decoder MoE layer routed it to.
    """
    _check_options(beam_size, nbest, alpha, beta, min_len)
    with eval_mode(model):
        batch, k = src.size(0), beam_size
        device = src.device
        max_len = max_target_lengths(src_lengths, max_len_a, max_len_b)  # [B]
        best_possible_lp = length_penalty(max_len, alpha)  # [B] largest length penalty a hypothesis can get

        active = torch.arange(batch, device=device)  # [A] original index of each sentence still searching
        beam_offsets = torch.arange(k, device=device)  # [K]
        enc = model.encode(src, src_lengths).index_select(active.repeat_interleave(k))  # rows [A*K]
        state = model.init_state(enc)
        scores = torch.full((batch, k), float("-inf"), device=device)  # [A, K] log-prob of each live beam
        scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
        tokens = torch.empty(batch * k, 0, dtype=torch.long, device=device)  # [A*K, t]
        coverage = torch.zeros(enc.mask.shape, device=device) if beta > 0 else None  # [A*K, S]
        experts: Tensor | None = None  # [A*K, t, layers, k_moe] when return_experts
        prev = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)  # [A*K]

        finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
        kth_best = torch.full((batch,), float("-inf"), device=device)  # [B] score of the nbest-th finished

        def finalize(
            rows: Tensor,
            hyp_tokens: Tensor,
            log_prob: Tensor,
            length: int,
            cov: Tensor | None,
            hyp_experts: Tensor | None,
        ) -> None:
            """Move hypotheses (rows of the current [A*K] batch) to `finished` and refresh kth_best."""
            sentence = active[torch.div(rows, k, rounding_mode="floor")]
            score = log_prob / length_penalty(torch.tensor(float(length)), alpha)
            if cov is not None:
                score = score + coverage_penalty(cov, enc.mask[rows], beta)
            expert_lists = hyp_experts.tolist() if hyp_experts is not None else [None] * rows.numel()
            for s, toks, lp, sc, ex in zip(
                sentence.tolist(),
                hyp_tokens.tolist(),
                log_prob.tolist(),
                score.tolist(),
                expert_lists,
                strict=True,
            ):
                finished[s].append(Hypothesis(tokens=toks, score=sc, log_prob=lp, experts=ex))
            for s in set(sentence.tolist()):
                if len(finished[s]) >= nbest:
                    finished[s].sort(key=lambda h: h.score, reverse=True)
                    kth_best[s] = finished[s][nbest - 1].score

        for t in range(int(max_len.max())):
            n_active = active.numel()
            step = model.decode_step(prev, state, enc)
            log_probs = step.log_probs  # [A*K, V] float32
            if t < min_len:
                log_probs = log_probs.index_fill(1, torch.tensor([EOS_ID], device=device), float("-inf"))
            step_coverage = coverage + step.attention.float() if coverage is not None else None  # [A*K, S]
            step_experts = None
            if return_experts:
                layers = step.expert_index  # list of [A*K, k_moe]
                step_experts = (
                    torch.stack(layers, dim=1)
                    if layers
                    else torch.empty(n_active * k, 0, 0, dtype=torch.long, device=device)
                )  # [A*K, layers, k_moe]
                if experts is None:
                    experts = step_experts.new_empty(n_active * k, 0, *step_experts.shape[1:])

            # 1. the 2K best continuations of each sentence. They are among the 2K best of their own beam,
            #    so only those enter the sum with the beam scores: [A*K, 2K], not [A*K, V].
            per_beam = min(2 * k, log_probs.size(1))
            beam_log_probs, beam_tokens = log_probs.topk(per_beam, dim=1)  # [A*K, 2K]
            candidates = (scores.unsqueeze(2) + beam_log_probs.view(n_active, k, per_beam)).view(
                n_active, k * per_beam
            )  # [A, K*2K] cumulative log-probs
            top_scores, top_index = candidates.topk(min(2 * k, k * per_beam), dim=1)  # [A, 2K], best first
            top_tokens = beam_tokens.view(n_active, k * per_beam).gather(1, top_index)  # [A, 2K]
            top_rows = (
                torch.div(top_index, per_beam, rounding_mode="floor")
                + torch.arange(n_active, device=device).unsqueeze(1) * k
            )  # [A, 2K] row of the parent beam in the [A*K] batch
            is_eos = top_tokens == EOS_ID

            # 2. EOS among the K best ends a hypothesis
            ended = is_eos[:, :k] & (top_scores[:, :k] > float("-inf"))  # [A, K]
            if ended.any():
                rows = top_rows[:, :k][ended]
                finalize(
                    rows,
                    tokens[rows],
                    top_scores[:, :k][ended],
                    t + 1,
                    step_coverage[rows] if step_coverage is not None else None,
                    experts[rows] if experts is not None else None,
                )

            # 3. the K best non-EOS candidates live on
            scores, pick = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)  # [A, K]
            rows = top_rows.gather(1, pick).view(-1)  # [A*K] parent row of each new beam
            new_tokens = top_tokens.gather(1, pick).view(-1)  # [A*K]
            tokens = torch.cat([tokens[rows], new_tokens.unsqueeze(1)], dim=1)
            state = step.state.index_select(rows)
            if step_coverage is not None:
                coverage = step_coverage[rows]
            if experts is not None and step_experts is not None:
                experts = torch.cat([experts[rows], step_experts[rows].unsqueeze(1)], dim=1)

            # 4. at the maximum length the live beams end without EOS
            at_max = max_len[active] <= t + 1  # [A]
            if at_max.any():
                alive = (at_max.unsqueeze(1) & (scores > float("-inf"))).view(-1)  # [A*K]
                rows = alive.nonzero().squeeze(1)
                finalize(
                    rows,
                    tokens[rows],
                    scores.view(-1)[rows],
                    t + 1,
                    coverage[rows] if coverage is not None else None,
                    experts[rows] if experts is not None else None,
                )

            # 5. stop sentences whose nbest finished hypotheses no live beam can beat
            done = at_max | (kth_best[active] >= scores[:, 0] / best_possible_lp[active])  # [A]
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)  # [A']
                keep_rows = (keep.unsqueeze(1) * k + beam_offsets).view(-1)  # [A'*K]
                active, scores = active[keep], scores[keep]
                tokens, enc, state = (
                    tokens[keep_rows],
                    enc.index_select(keep_rows),
                    state.index_select(keep_rows),
                )
                coverage = coverage[keep_rows] if coverage is not None else None
                experts = experts[keep_rows] if experts is not None else None
            prev = tokens[:, -1]

        return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


@torch.no_grad()
def reference_greedy_decode(
    model: Any, src: Tensor, src_lengths: Tensor, *, max_len_a: float = 1.5, max_len_b: int = 10
) -> tuple[list[list[int]], Tensor]:
    """greedy_decode as it was before the issue-18 restructure (commit b94f11b)."""
    was_training = model.training
    model.eval()
    try:
        B = src.shape[0]
        max_len = (max_len_a * src_lengths.float() + max_len_b).long().clamp(min=1)  # [B]
        enc = model.encode(src, src_lengths)
        state = model.init_state(enc)
        alive = torch.arange(B, device=src.device)  # rows of the original batch still decoding
        prev = torch.full((B,), 2, dtype=torch.long, device=src.device)
        scores = torch.zeros(B, device=src.device)
        tokens: list[list[int]] = [[] for _ in range(B)]
        for t in range(int(max_len.max())):
            step = model.decode_step(prev, state, enc)
            best_lp, best = step.log_probs.max(dim=-1)  # [N]
            scores[alive] += best_lp
            for row, token in zip(alive.tolist(), best.tolist(), strict=True):
                if token != 3:
                    tokens[row].append(token)
            done = (best == 3) | (t + 1 >= max_len[alive])  # [N]
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)  # [N']
            alive, prev = alive[keep], best[keep]
            state, enc = step.state.index_select(keep), enc.index_select(keep)
        return tokens, scores
    finally:
        model.train(was_training)
