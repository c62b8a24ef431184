"""Batched beam search with GNMT length and coverage penalties.

All sentences of a batch and all their beams advance together: the decoder sees one batch of
[active sentences * beam_size] rows per step. Encoder states and attention keys are computed once per
source (keys are projected in `encode`) and only shrink (index_select) as sentences finish: a finished
sentence leaves the batch. Finished hypotheses are kept in tensors too (`Finished`), so no step does
Python work per sentence or per hypothesis; only the final n-best lists become Python objects.

Search, per step t (t tokens generated so far):
  1. expand: every live beam proposes its 2K best next tokens; the 2K best (cumulative log-prob) of these
     candidates per sentence are taken, so at least K of them are not EOS;
  2. finish: EOS candidates among the K best end a hypothesis (scored with the GNMT penalties, see
     penalties.py);
  3. advance: the K best non-EOS candidates become the new live beams (ranked by log-prob: they all have the
     same length, and the coverage penalty is applied to finished hypotheses only);
  4. finish: at a sentence's maximum length (`max_target_lengths`) its live beams end without EOS;
  5. prune: a sentence stops once `nbest` finished hypotheses score at least the best score a live beam
     could still reach. That bound is exact, not a heuristic: log-probs only fall as tokens are added, the
     length penalty is largest at the maximum length, and the coverage penalty is never positive, so a
     live beam can at most reach logp / lp(max_len). With alpha = 0 this is the usual "best live log-prob"
     test.

With beam_size 1 and alpha = beta = 0 this is greedy search (same tokens, same score); `greedy_decode`
is the leaner loop for that case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nmt_moe.decoding.finished import Finished, Hypothesis
from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.penalties import coverage_penalty, length_penalty
from nmt_moe.decoding.search import BOS_ID, EOS_ID, block_eos_, eval_mode, max_target_lengths

__all__ = ["BOS_ID", "EOS_ID", "Hypothesis", "beam_search", "eval_mode", "max_target_lengths"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SearchOptions:
    """Settings of one search, checked once."""

    beam_size: int
    nbest: int
    alpha: float
    beta: float
    min_len: int
    return_experts: bool

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.min_len < 0:
            raise ValueError(f"min_len must be >= 0, got {self.min_len}")


@dataclass
class Candidates:
    """The 2K best continuations of each active sentence after one decoder step (best first)."""

    scores: Tensor  # [A, 2K] cumulative log-probs
    tokens: Tensor  # [A, 2K]
    rows: Tensor  # [A, 2K] parent beam's row in the [A*K] batch
    coverage: Tensor | None  # [A*K, S] attention summed up to this step, per parent row
    experts: Tensor | None  # [A*K, layers, k_moe] experts this step routed each parent row to


@dataclass
class Beams:
    """Live beams of the sentences still searching; rows [A*K] are sentence-major (K per sentence)."""

    active: Tensor  # [A] original index of each sentence
    scores: Tensor  # [A, K] cumulative log-prob of each live beam (-inf: no beam there yet)
    tokens: Tensor  # [A*K, t] generated ids
    enc: Any  # encoder output, rows [A*K]
    state: Any  # decoder state, rows [A*K]
    coverage: Tensor | None  # [A*K, S] summed attention (coverage penalty only)
    experts: Tensor | None  # [A*K, t, layers, k_moe] (return_experts only; set at the first step)

    @classmethod
    def start(cls, model: Any, src: Tensor, src_lengths: Tensor, k: int, beta: float) -> Beams:
        """K copies of every sentence; only the first is live, so step 1 picks K distinct tokens."""
        batch, device = src.size(0), src.device
        active = torch.arange(batch, device=device)
        enc = model.encode(src, src_lengths).index_select(active.repeat_interleave(k))  # rows [B*K]
        scores = torch.full((batch, k), NEG_INF, device=device)
        scores[:, 0] = 0.0
        tokens = torch.empty(batch * k, 0, dtype=torch.long, device=device)
        coverage = torch.zeros(enc.mask.shape, device=device) if beta > 0 else None  # [B*K, S]
        return cls(active, scores, tokens, enc, model.init_state(enc), coverage, None)

    @property
    def prev(self) -> Tensor:
        """[A*K] the token each beam feeds the decoder next."""
        if self.tokens.size(1) == 0:
            return torch.full((self.tokens.size(0),), BOS_ID, dtype=torch.long, device=self.tokens.device)
        return self.tokens[:, -1]

    def expand(self, step: Any, t: int, opts: SearchOptions) -> Candidates:
        """Step 1. The 2K best of a sentence are among the 2K best of their own beam, so only those enter
        the sum with the beam scores: [A*K, 2K], not [A*K, V]."""
        n_active, k = self.scores.shape
        log_probs = block_eos_(step.log_probs, t, opts.min_len)  # [A*K, V] float32
        per_beam = min(2 * k, log_probs.size(1))
        beam_log_probs, beam_tokens = log_probs.topk(per_beam, dim=1)  # [A*K, 2K]
        summed = (self.scores.unsqueeze(2) + beam_log_probs.view(n_active, k, per_beam)).view(n_active, -1)
        top_scores, top_index = summed.topk(min(2 * k, k * per_beam), dim=1)  # [A, 2K], best first
        top_tokens = beam_tokens.view(n_active, -1).gather(1, top_index)  # [A, 2K]
        first_row = torch.arange(n_active, device=top_index.device).unsqueeze(1) * k  # [A, 1]
        top_rows = torch.div(top_index, per_beam, rounding_mode="floor") + first_row  # [A, 2K]
        coverage = self.coverage + step.attention.float() if self.coverage is not None else None
        experts = _step_experts(step, n_active * k, top_rows.device) if opts.return_experts else None
        if experts is not None and self.experts is None:  # routing shape known now: [A*K, 0, layers, k_moe]
            self.experts = experts.new_empty(experts.size(0), 0, *experts.shape[1:])
        return Candidates(top_scores, top_tokens, top_rows, coverage, experts)

    def advance(self, cands: Candidates, step: Any) -> None:
        """Step 3: the K best non-EOS candidates become the live beams."""
        k = self.scores.size(1)
        self.scores, pick = cands.scores.masked_fill(cands.tokens == EOS_ID, NEG_INF).topk(k, dim=1)
        rows = cands.rows.gather(1, pick).view(-1)  # [A*K] parent row of each new beam
        self.tokens = torch.cat([self.tokens[rows], cands.tokens.gather(1, pick).view(-1, 1)], dim=1)
        self.state = step.state.index_select(rows)
        if cands.coverage is not None:
            self.coverage = cands.coverage[rows]
        if cands.experts is not None and self.experts is not None:
            self.experts = torch.cat([self.experts[rows], cands.experts[rows].unsqueeze(1)], dim=1)

    def prune(self, keep: Tensor) -> None:
        """Step 5: only sentences `keep` [A'] (indices into the active ones) search on."""
        k = self.scores.size(1)
        rows = (keep.unsqueeze(1) * k + torch.arange(k, device=keep.device)).view(-1)  # [A'*K]
        self.active, self.scores, self.tokens = self.active[keep], self.scores[keep], self.tokens[rows]
        self.enc, self.state = self.enc.index_select(rows), self.state.index_select(rows)
        self.coverage = self.coverage[rows] if self.coverage is not None else None
        self.experts = self.experts[rows] if self.experts is not None else None


def _step_experts(step: Any, rows: int, device: torch.device) -> Tensor:
    """[rows, layers, k_moe] experts of this step's decoder MoE layers ([rows, 0, 0] without any)."""
    layers = step.expert_index  # list of [rows, k_moe]
    if not layers:
        return torch.empty(rows, 0, 0, dtype=torch.long, device=device)
    return torch.stack(layers, dim=1)


def finish_eos(finished: Finished, beams: Beams, cands: Candidates, t: int, opts: SearchOptions) -> None:
    """Step 2: EOS candidates among the K best end their hypothesis (their tokens are the parent's)."""
    k = beams.scores.size(1)
    ended = (cands.tokens[:, :k] == EOS_ID) & (cands.scores[:, :k] > NEG_INF)  # [A, K]
    if not bool(ended.any()):
        return
    rows = cands.rows[:, :k]  # [A, K]
    flat = rows.reshape(-1)
    log_prob = cands.scores[:, :k]
    cov = None if cands.coverage is None else cands.coverage[flat]
    experts = (
        None if beams.experts is None else beams.experts[flat].view(*rows.shape, *beams.experts.shape[1:])
    )
    score = _score(log_prob, t + 1, cov, beams.enc.mask[flat] if cov is not None else None, opts)
    finished.add(beams.active, ended, log_prob, score, beams.tokens[flat].view(*rows.shape, -1), experts)


def finish_at_max(finished: Finished, beams: Beams, at_max: Tensor, t: int, opts: SearchOptions) -> None:
    """Step 4: at a sentence's maximum length (at_max [A]) its live beams end without EOS."""
    if not bool(at_max.any()):
        return
    shape = beams.scores.shape  # [A, K]
    alive = at_max.unsqueeze(1) & (beams.scores > NEG_INF)  # [A, K]
    mask = beams.enc.mask if beams.coverage is not None else None
    score = _score(beams.scores, t + 1, beams.coverage, mask, opts)
    experts = None if beams.experts is None else beams.experts.view(*shape, *beams.experts.shape[1:])
    finished.add(beams.active, alive, beams.scores, score, beams.tokens.view(*shape, -1), experts)


def _score(
    log_prob: Tensor, length: int, cov: Tensor | None, src_mask: Tensor | None, opts: SearchOptions
) -> Tensor:
    """GNMT score log_prob / lp(length) + cp of hypotheses log_prob [A, K]; cov, src_mask [A*K, S]."""
    score = log_prob / length_penalty(torch.tensor(float(length)), opts.alpha)
    if cov is not None and src_mask is not None:
        score = score + coverage_penalty(cov, src_mask, opts.beta).view(log_prob.shape)
    return score


# no_grad, not inference_mode: under bf16 autocast, autocast caches the bf16 copy of each weight for the whole
# search only outside inference mode; inside it, every step re-casts the output layer and LSTM weights.
@torch.no_grad()
def beam_search(
    model: Any,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int = DecodeOptions.beam_size,
    nbest: int = DecodeOptions.nbest,
    alpha: float = DecodeOptions.alpha,
    beta: float = DecodeOptions.beta,
    max_len_a: float = DecodeOptions.max_len_a,
    max_len_b: float = DecodeOptions.max_len_b,
    min_len: int = DecodeOptions.min_len,
    return_experts: bool = False,
) -> list[list[Hypothesis]]:
    """Translate a batch; returns per sentence its `nbest` best hypotheses, best first.

    model: anything with the Seq2Seq decoding interface (encode / init_state / decode_step);
    src: Long [B, S] source ids + EOS, right-padded; src_lengths: Long [B].
    min_len: EOS is blocked until this many tokens have been generated.
    The model runs in eval mode (MoE gates route without noise, as at the end of training).
    return_experts: also record, per target token, the experts each decoder MoE layer routed it to.
    """
    opts = SearchOptions(beam_size, nbest, alpha, beta, min_len, return_experts)
    with eval_mode(model):
        max_len = max_target_lengths(src_lengths, max_len_a, max_len_b)  # [B]
        best_possible_lp = length_penalty(max_len, alpha)  # [B] largest length penalty a hypothesis can get
        beams = Beams.start(model, src, src_lengths, beam_size, beta)
        finished = Finished(src.size(0), nbest, int(max_len.max()), src.device)
        for t in range(int(max_len.max())):
            step = model.decode_step(beams.prev, beams.state, beams.enc)
            cands = beams.expand(step, t, opts)
            finish_eos(finished, beams, cands, t, opts)
            beams.advance(cands, step)
            at_max = max_len[beams.active] <= t + 1  # [A]
            finish_at_max(finished, beams, at_max, t, opts)
            bound = beams.scores[:, 0] / best_possible_lp[beams.active]  # [A] best a live beam can reach
            done = at_max | (finished.kth_best[beams.active] >= bound)  # [A]
            if bool(done.all()):
                break
            if bool(done.any()):
                beams.prune((~done).nonzero().squeeze(1))
        return finished.hypotheses()
