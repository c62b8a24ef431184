"""The finished side of beam search: each sentence's n best ended hypotheses, held in tensors.

A batch can end thousands of hypotheses over a search (up to K per sentence and step, most of them never
in any n-best list). Keeping them as Python objects made every step do Python work proportional to the
batch; here each step's endings merge into a fixed [B, nbest] table with a few tensor ops, and only the
final n-best lists become `Hypothesis` objects.

Ranking is a stable sort by score, best first, over hypotheses in the order they ended (within one step:
sentence-major, then candidate rank): equal scores keep the earlier hypothesis first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nmt_moe.decoding.search import PAD_ID

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One finished translation of one sentence."""

    tokens: list[int]  # target ids, no BOS/EOS
    score: float  # GNMT score used for ranking: log_prob / lp + cp
    log_prob: float  # model log-probability of `tokens` (+ EOS when the hypothesis ended with one)
    # experts[i][l] = expert ids (k of them) that decoder MoE layer l routed the step producing tokens[i] to
    experts: list[list[list[int]]] | None = None


class Finished:
    """Per sentence, the `nbest` best finished hypotheses so far (score -inf = empty slot)."""

    def __init__(self, batch: int, nbest: int, max_len: int, device: torch.device) -> None:
        self.nbest, self.max_len = nbest, max_len
        self.score = torch.full((batch, nbest), NEG_INF, device=device)  # [B, n] best first
        self.log_prob = torch.zeros(batch, nbest, device=device)  # [B, n]
        self.length = torch.zeros(batch, nbest, dtype=torch.long, device=device)  # [B, n]
        self.tokens = torch.full((batch, nbest, max_len), PAD_ID, dtype=torch.long, device=device)  # [B,n,T]
        self.experts: Tensor | None = None  # [B, n, T, layers, k_moe], -1 beyond a hypothesis' length

    @property
    def kth_best(self) -> Tensor:
        """[B] score of each sentence's nbest-th finished hypothesis (-inf while it has fewer)."""
        return self.score[:, -1]

    def add(
        self,
        sentences: Tensor,
        valid: Tensor,
        log_prob: Tensor,
        score: Tensor,
        tokens: Tensor,
        experts: Tensor | None,
    ) -> None:
        """Merges the hypotheses where valid [A, M] into the table. sentences [A] (original indices, all
        different); log_prob, score [A, M]; tokens [A, M, w] (every hypothesis here has length w);
        experts [A, M, w, layers, k_moe] or None."""
        rows = valid.any(dim=1).nonzero().squeeze(1)  # [A'] the sentences that gained a hypothesis
        s = sentences[rows]
        merged = torch.cat(
            [self.score[s], score[rows].masked_fill(~valid[rows], NEG_INF)], dim=1
        )  # [A', n+M]
        order = merged.sort(dim=1, descending=True, stable=True).indices[:, : self.nbest]  # [A', n]
        lengths = torch.full((s.numel(), valid.size(1)), tokens.size(2), dtype=torch.long, device=s.device)
        self.score[s] = merged.gather(1, order)
        self.log_prob[s] = torch.cat([self.log_prob[s], log_prob[rows]], dim=1).gather(1, order)
        self.length[s] = torch.cat([self.length[s], lengths], dim=1).gather(1, order)
        self.tokens[s] = _take(self.tokens[s], _pad_time(tokens[rows], self.max_len, PAD_ID), order)
        if experts is not None:
            if self.experts is None:
                shape = (self.score.size(0), self.nbest, self.max_len, *experts.shape[3:])
                self.experts = torch.full(shape, -1, dtype=torch.long, device=experts.device)
            self.experts[s] = _take(self.experts[s], _pad_time(experts[rows], self.max_len, -1), order)

    def hypotheses(self) -> list[list[Hypothesis]]:
        """Each sentence's n-best list, best first (fewer where fewer hypotheses ended)."""
        score, log_prob = self.score.tolist(), self.log_prob.tolist()
        length, tokens = self.length.tolist(), self.tokens.tolist()
        experts = self.experts.tolist() if self.experts is not None else None
        out = []
        for b, row in enumerate(score):
            hyps = []
            for j, value in enumerate(row):
                if value == NEG_INF:
                    break
                n = length[b][j]
                routed = experts[b][j][:n] if experts is not None else None
                hyps.append(Hypothesis(tokens[b][j][:n], value, log_prob[b][j], routed))
            out.append(hyps)
        return out


def _pad_time(x: Tensor, length: int, value: int) -> Tensor:
    """x [A, M, w, ...] padded along dim 2 to [A, M, length, ...] with `value`."""
    tail = [0, 0] * (x.dim() - 3)
    return F.pad(x, [*tail, 0, length - x.size(2)], value=value)


def _take(old: Tensor, new: Tensor, order: Tensor) -> Tensor:
    """Entries `order` [A, n] of cat([old [A, n, ...], new [A, M, ...]], dim 1): [A, n, ...]."""
    both = torch.cat([old, new], dim=1)
    index = order.view(*order.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
    return both.gather(1, index)
