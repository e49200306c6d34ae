# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""Level 2, `gather` backend for per-token routing (causal self-attention, cross-attention): block-major pieces.

With per-token routing, neighbouring queries may choose different blocks, so a query tile that gathers the union of
its tokens' blocks can read many blocks that most of its rows do not use. Here the work is organised by key block
instead: the (token, block) pairs of the plan are sorted by block, and each block's tokens are cut into *pieces* of
``rows`` tokens. A piece is one small matmul of its tokens' queries (all heads of the group) against one key block,
so the work is exactly ``tokens * top_k * block_size`` scores plus the padding of each block's last piece.

A token's softmax spans the pieces of its k blocks, which sit in different chunks, so its maximum score is not known
when the first of them is computed. The softmax does not need the maximum, only a shift ``m`` that keeps ``exp(s - m)``
finite and the largest term from underflowing: any score the row can see is such a shift as long as the row's maximum is
less than ~88 above it (float32's ``exp`` overflows past that). The forward pass therefore first computes only each
row's *anchor* piece (a causal token's own block; otherwise the row's block that most rows chose, e.g. a global block:
often about 1/k of the work) and takes the row maximum there (scatter-max), then makes one pass over all pieces
accumulating ``exp(s - m)``, their sums and the weighted values (scatter-add). If a sum or an output is not finite, or a
row without a visible anchor score underflowed, the call is recomputed with the exact row maxima of all pieces (the
twice-over-the-pieces forward this replaced), so the shortcut changes the result by rounding only (the shifted scores
``s - m`` are exact to ~4e-6 relative when ``m`` lies up to ~88 below the maximum; a row shifted by 0 for want of an
anchor, whose scores all lie near -69, can lose precision in products with values below ~1e-13). The backward pass is
flash-style from the saved log-sum-exp, like the tile kernel in `gather_dualroute.py`; both are tested against the
`reference` backend.
"""

from __future__ import annotations

import math

import torch

from .gather_dualroute import select_into, workspace_view
from .routing_dualroute import num_blocks


# Scores per chunk of pieces (float32 elements); same budget reasoning as the tile kernel.
SCORE_ELEMENTS_PER_CHUNK = 1 << 19
MAX_ROWS_PER_PIECE = 64


class _Pieces:
    """The piece tables of one call, shared by the forward and backward passes."""

    def __init__(
        self, query_shape, key_shape, plan, block_size, key_valid, causal, query_offset, device, compute_dtype
    ):
        self.batch, self.q_heads, self.q_len, self.dim = query_shape
        _, self.kv_heads, self.k_len, _ = key_shape
        self.group = self.q_heads // self.kv_heads
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.causal = causal
        heads = self.batch * self.kv_heads
        self.n_key_blocks = num_blocks(self.k_len, block_size)
        self.n_rows = heads * self.q_len  # one row per (batch, kv head, token); a row holds the group's heads

        # (token row, block) pairs, sorted by global block so that each block's tokens are contiguous
        top_k = plan.shape[-1]
        flat_plan = plan.reshape(heads, self.q_len * top_k)
        row = (
            torch.arange(self.q_len, device=device).repeat_interleave(top_k)[None, :]
            + self.q_len * torch.arange(heads, device=device)[:, None]
        )
        global_block = flat_plan + self.n_key_blocks * torch.arange(heads, device=device)[:, None]
        valid = flat_plan >= 0
        pair_row, pair_block = row[valid], global_block[valid]
        order = torch.argsort(pair_block, stable=True)
        pair_row, pair_block = pair_row[order], pair_block[order]

        # cut each block's run of tokens into pieces of `rows` tokens
        counts = torch.bincount(pair_block, minlength=heads * self.n_key_blocks)
        used = counts > 0
        average = pair_row.numel() / max(1, int(used.sum()))
        self.rows = min(MAX_ROWS_PER_PIECE, 1 << max(0, math.floor(math.log2(max(average, 1.0)))))
        pieces_per_block = (counts + self.rows - 1) // self.rows
        first_piece = torch.cumsum(pieces_per_block, 0) - pieces_per_block
        start_of_block = torch.cumsum(counts, 0) - counts
        rank = torch.arange(pair_row.numel(), device=device) - start_of_block[pair_block]  # position within the block
        piece = first_piece[pair_block] + rank // self.rows
        self.n_pieces = int(pieces_per_block.sum())
        self.piece_rows = torch.full((self.n_pieces, self.rows), self.n_rows, dtype=torch.long, device=device)
        self.piece_rows[piece, rank % self.rows] = pair_row  # padding points at an extra, all-masked row
        # each row's anchor piece, one that many rows share: a causal token's own block (its highest: pieces follow
        # block order), else the row's most chosen block (a global block is every row's; ties: the higher block)
        preference = piece if causal else counts[pair_block] * self.n_pieces + piece
        anchor = torch.full((self.n_rows,), -1, dtype=torch.long, device=device)
        anchor.scatter_reduce_(0, pair_row, preference, reduce="amax")
        has_blocks = anchor >= 0
        anchor = torch.where(has_blocks, anchor % max(1, self.n_pieces), -1)  # no pieces at all: all keys padding
        self.anchor_pieces = torch.unique(anchor[has_blocks])  # sorted
        self.piece_block = torch.repeat_interleave(
            torch.arange(heads * self.n_key_blocks, device=device), pieces_per_block
        )

        # visibility inside a piece: real key, real row, causality
        self.key_valid = None
        if key_valid is not None or self.n_key_blocks * block_size != self.k_len:
            valid_keys = (
                torch.ones(self.batch, self.k_len, dtype=torch.bool, device=device) if key_valid is None else key_valid
            )
            valid_keys = torch.nn.functional.pad(
                valid_keys, (0, self.n_key_blocks * block_size - self.k_len), value=False
            )
            self.key_valid = valid_keys.view(self.batch, 1, self.n_key_blocks, block_size).expand(
                -1, self.kv_heads, -1, -1
            )
            self.key_valid = self.key_valid.reshape(heads * self.n_key_blocks, block_size)
        if causal:
            token = torch.arange(self.n_rows + 1, device=device) % self.q_len
            self.row_position = query_offset + token  # the padding row's position does not matter: it is masked
            self.block_start = (
                torch.arange(heads * self.n_key_blocks, device=device) % self.n_key_blocks
            ) * block_size
            self.key_offset = torch.arange(block_size, device=device)

        # Whether each row sees any key. Routing never selects a block without a real key, so a row with a block
        # does, except that a causal row sees its own block only up to itself, which may be all padding (left
        # padding): then it sees a key only if another of its blocks has a real key before it.
        sees_keys = has_blocks
        if causal and self.key_valid is not None:
            real_so_far = self.key_valid.cumsum(-1)  # real keys up to each offset of each block
            offset = (self.row_position[pair_row] - self.block_start[pair_block]).clamp(max=block_size - 1)
            visible = (real_so_far[pair_block, offset] > 0).long()
            sees_keys = torch.zeros_like(anchor).scatter_reduce_(0, pair_row, visible, reduce="amax") > 0
        # per score row (row, group head), the extra padding row last
        self.row_sees_keys = torch.cat([sees_keys, sees_keys.new_zeros(1)]).repeat_interleave(self.group)
        self.pieces_per_chunk = max(1, SCORE_ELEMENTS_PER_CHUNK // (self.rows * self.group * block_size))

        # Which pieces need a mask at all: only a block with invalid keys (padding, the ragged tail) or, when causal, a
        # block that ends after the piece's first token (that token's own block). Every other selected block lies
        # wholly in the past of all its tokens. Padding rows of a piece need none: their query is the zero row and
        # what they compute lands on the extra row, which is dropped.
        needs_mask = torch.zeros(self.n_pieces, dtype=torch.bool, device=device)
        if self.key_valid is not None:
            needs_mask |= ~self.key_valid.all(-1)[self.piece_block]
        if causal:
            real = self.piece_rows < self.n_rows
            big = query_offset + self.q_len + self.n_key_blocks * block_size
            first_position = torch.where(real, self.row_position[self.piece_rows], big).amin(-1)
            needs_mask |= self.block_start[self.piece_block] + block_size - 1 > first_position
        self.needs_mask = needs_mask if bool(needs_mask.any()) else None

    # -- layouts -------------------------------------------------------------------------------------------------------

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, hq, lq, d)`` -> ``(rows + 1, group, d)`` in the compute dtype; the last row is zeros (padding)."""
        x = x.to(self.compute_dtype).view(self.batch, self.kv_heads, self.group, self.q_len, self.dim)
        x = x.transpose(2, 3).reshape(self.n_rows, self.group, self.dim)
        return torch.cat([x, x.new_zeros(1, self.group, self.dim)])

    def from_rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x[: self.n_rows].view(self.batch, self.kv_heads, self.q_len, self.group, self.dim)
        return x.transpose(2, 3).reshape(self.batch, self.q_heads, self.q_len, self.dim)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        pad = self.n_key_blocks * self.block_size - self.k_len
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(self.batch * self.kv_heads * self.n_key_blocks, self.block_size, self.dim)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(self.batch, self.kv_heads, self.n_key_blocks * self.block_size, self.dim)
        return x[:, :, : self.k_len]

    # -- per chunk of pieces --------------------------------------------------------------------------------------------

    def chunks(self, subset: torch.Tensor | None = None):
        """Slices of all pieces, or index tensors of the pieces in ``subset``, ``pieces_per_chunk`` at a time."""
        count = self.n_pieces if subset is None else subset.numel()
        for start in range(0, count, self.pieces_per_chunk):
            part = slice(start, min(start + self.pieces_per_chunk, count))
            yield part if subset is None else subset[part]

    def workspace(self, *names: str) -> dict[str, torch.Tensor]:
        """Buffers for one chunk, allocated once per pass and reused (`workspace_view`): fresh multi-megabyte tensors
        per chunk cost page faults that measured as a third of a causal call here."""
        piece_rows = self.pieces_per_chunk * self.rows * self.group
        sizes = {
            "queries": piece_rows * self.dim,
            "keys": self.pieces_per_chunk * self.block_size * self.dim,
            "values": self.pieces_per_chunk * self.block_size * self.dim,
            "scores": piece_rows * self.block_size,
            "grad_scores": piece_rows * self.block_size,
            "rows_out": piece_rows * self.dim,  # per-row products: weighted values, gradients of the queries
            "grad_out": piece_rows * self.dim,
            "block_out": self.pieces_per_chunk * self.block_size * self.dim,  # gradients of a key or value block
        }
        device = self.piece_rows.device
        return {name: torch.empty(sizes[name], dtype=self.compute_dtype, device=device) for name in names}

    def scores(self, q_rows, k_blocks, chunk, scale: float, work: dict):
        """Gathered queries ``(pieces, rows * group, d)``, keys ``(pieces, block, d)`` and masked scaled scores."""
        rows, blocks = self.piece_rows[chunk], self.piece_block[chunk]
        pieces, height = rows.shape[0], self.rows * self.group
        queries = select_into(q_rows, rows.reshape(-1), work["queries"]).view(pieces, height, self.dim)
        keys = select_into(k_blocks, blocks, work["keys"])
        scores = workspace_view(work["scores"], pieces, height, self.block_size)
        torch.baddbmm(scores, queries, keys.transpose(1, 2), beta=0.0, alpha=scale, out=scores)
        if self.needs_mask is not None:
            self.mask(scores, chunk)
        return queries, keys, scores

    def mask(self, scores: torch.Tensor, chunk) -> None:
        """Sets the invisible scores of the chunk's pieces that need a mask to ``-inf``."""
        masked = self.needs_mask[chunk].nonzero().squeeze(1)
        if masked.numel() == 0:
            return
        rows, blocks = self.piece_rows[chunk][masked], self.piece_block[chunk][masked]
        visible = torch.ones(1, 1, 1, self.block_size, dtype=torch.bool, device=scores.device)
        if self.key_valid is not None:
            visible = self.key_valid[blocks][:, None, None, :]
        if self.causal:
            key_position = self.block_start[blocks][:, None] + self.key_offset  # pieces block
            visible = visible & (key_position[:, None, None, :] <= self.row_position[rows][:, :, None, None])
        part = scores.index_select(0, masked).view(masked.numel(), self.rows, self.group, self.block_size)
        part.masked_fill_(~visible, float("-inf"))
        scores.index_copy_(0, masked, part.view(masked.numel(), self.rows * self.group, self.block_size))

    def row_index(self, chunk) -> torch.Tensor:
        """Flat ``(row, group head)`` index of every score row of the chunk: ``(pieces * rows * group,)``."""
        rows = self.piece_rows[chunk]
        return (rows[:, :, None] * self.group + torch.arange(self.group, device=rows.device)).reshape(-1)


def _row_max(pieces: _Pieces, q_rows, k_blocks, scale: float, work: dict, subset=None) -> torch.Tensor:
    """Each row's maximum visible score over the pieces of ``subset`` (all pieces: ``None``); ``-inf`` where none."""
    row_max = torch.full(
        ((pieces.n_rows + 1) * pieces.group,), float("-inf"), dtype=q_rows.dtype, device=q_rows.device
    )
    for chunk in pieces.chunks(subset):
        _, _, scores = pieces.scores(q_rows, k_blocks, chunk, scale, work)
        row_max.scatter_reduce_(0, pieces.row_index(chunk), scores.amax(-1).reshape(-1), reduce="amax")
    return row_max


def _accumulate(pieces: _Pieces, q_rows, k_blocks, v_blocks, shift: torch.Tensor, scale: float, work: dict):
    """One pass over all pieces: per row the sum of ``exp(score - shift)`` and the sum of those weights times the
    values."""
    row_sum = torch.zeros_like(shift)
    out = torch.zeros(shift.numel(), pieces.dim, dtype=q_rows.dtype, device=q_rows.device)
    for chunk in pieces.chunks():
        _, _, scores = pieces.scores(q_rows, k_blocks, chunk, scale, work)
        index = pieces.row_index(chunk)
        probs = scores.sub_(shift[index].view(scores.shape[:2] + (1,))).exp_()
        row_sum.index_add_(0, index, probs.sum(-1).reshape(-1))
        values = select_into(v_blocks, pieces.piece_block[chunk], work["values"])
        weighted = workspace_view(work["rows_out"], *probs.shape[:2], pieces.dim)
        out.index_add_(0, index, torch.bmm(probs, values, out=weighted).view(-1, pieces.dim))
    return row_sum, out


# A row that sees keys but none in its anchor piece gets the shift 0; its weights have underflowed when their sum is
# below this (all its scores ~69 or more below 0), and it is recomputed with its exact maximum.
_UNDERFLOW = 2.0**-100


class _TokenGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, pieces: _Pieces, scale: float):
        q_rows, k_blocks, v_blocks = pieces.to_rows(query), pieces.to_blocks(key), pieces.to_blocks(value)
        work = pieces.workspace("queries", "keys", "values", "scores", "rows_out")
        anchor_max = _row_max(pieces, q_rows, k_blocks, scale, work, subset=pieces.anchor_pieces)
        anchored = anchor_max > float("-inf")
        shift = anchor_max.nan_to_num(neginf=0.0)
        row_sum, out = _accumulate(pieces, q_rows, k_blocks, v_blocks, shift, scale, work)
        underflow = (~anchored & pieces.row_sees_keys & (row_sum < _UNDERFLOW)).any()
        overflow = ~torch.isfinite(row_sum.sum() + out.sum())  # an inf or NaN anywhere makes the sums inf or NaN
        if bool(underflow | overflow):
            # the anchor's shift overflowed or underflowed somewhere: the exact row maxima over all pieces instead
            shift = _row_max(pieces, q_rows, k_blocks, scale, work).nan_to_num_(neginf=0.0)
            row_sum, out = _accumulate(pieces, q_rows, k_blocks, v_blocks, shift, scale, work)
        empty = row_sum == 0  # rows with no visible key
        out.div_(row_sum.masked_fill(empty, 1.0)[:, None])
        lse = (shift + row_sum.log()).masked_fill_(empty, float("inf"))
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.pieces, ctx.scale = pieces, scale
        return pieces.from_rows(out.view(pieces.n_rows + 1, pieces.group, pieces.dim)).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        pieces, scale = ctx.pieces, ctx.scale
        q_rows, k_blocks, v_blocks = pieces.to_rows(query), pieces.to_blocks(key), pieces.to_blocks(value)
        grad_rows = pieces.to_rows(grad_out.contiguous()).reshape(-1, pieces.dim)  # (rows + 1) * group, d
        delta = (grad_rows * out).sum(-1)  # rowsum(dO * O)
        grad_q = torch.zeros_like(grad_rows)
        grad_k, grad_v = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        work = pieces.workspace(
            "queries", "keys", "values", "scores", "grad_scores", "rows_out", "grad_out", "block_out"
        )
        for chunk in pieces.chunks():
            queries, keys, scores = pieces.scores(q_rows, k_blocks, chunk, scale, work)
            index = pieces.row_index(chunk)
            count, height = scores.shape[:2]
            shape = (count, height, 1)
            probs = scores.sub_(lse[index].view(shape)).exp_()
            blocks = pieces.piece_block[chunk]
            values = select_into(v_blocks, blocks, work["values"])
            grad_o = select_into(grad_rows, index, work["grad_out"]).view(count, height, pieces.dim)
            block_out = workspace_view(work["block_out"], count, pieces.block_size, pieces.dim)
            grad_v.index_add_(0, blocks, torch.bmm(probs.transpose(1, 2), grad_o, out=block_out))
            grad_scores = workspace_view(work["grad_scores"], count, height, pieces.block_size)
            torch.bmm(grad_o, values.transpose(1, 2), out=grad_scores).sub_(delta[index].view(shape)).mul_(probs)
            grad_scores.mul_(scale)  # d(loss)/d(raw scores q.k): the gradients need no scaling afterwards
            rows_out = workspace_view(work["rows_out"], count, height, pieces.dim)
            grad_q.index_add_(0, index, torch.bmm(grad_scores, keys, out=rows_out).view(-1, pieces.dim))
            grad_k.index_add_(0, blocks, torch.bmm(grad_scores.transpose(1, 2), queries, out=block_out))
        grad_query = pieces.from_rows(grad_q.view(pieces.n_rows + 1, pieces.group, pieces.dim))
        return (
            grad_query.to(query.dtype),
            pieces.from_blocks(grad_k).to(key.dtype),
            pieces.from_blocks(grad_v).to(value.dtype),
            None,
            None,
        )


def token_gather_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: torch.Tensor,
    *,
    block_size: int,
    key_valid: torch.Tensor | None,
    causal: bool,
    query_offset: int,
    scale: float,
) -> torch.Tensor:
    """Per-token routed attention: ``plan (b, hk, lq, k)``; same contract as `gather_attention`. No dropout."""
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    pieces = _Pieces(
        query.shape, key.shape, plan, block_size, key_valid, causal, query_offset, query.device, compute_dtype
    )
    return _TokenGatherAttention.apply(query, key, value, pieces, scale)
