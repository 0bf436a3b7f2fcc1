"""The encoder-decoder Transformer of "Attention Is All You Need", on the fused ops.

Token embeddings scaled by sqrt(d_model) + sinusoidal (or learned) positions, dropout;
N encoder layers (self-attention, feed-forward) and N decoder layers (causal
self-attention, cross-attention, feed-forward); residual sublayers, pre-norm by default
(post-norm as in the paper on request); a generator (linear + log_softmax, optionally
tied to the target embedding). Every attention, LayerNorm and feed-forward runs through
fused_attn with the model's backend.

Residual adds are fused into the LayerNorm that follows them: a sublayer hands its
(dropped-out) output to the next LayerNorm as ``input`` with the residual stream as
``residual``, which returns the normalised sum and the new stream.

Masks: the source key-padding mask (B, 1, 1, Ls) is built from pad_id. Targets are
right-padded, so causal attention alone keeps every real query away from padding (a
query only sees earlier positions); padded positions' outputs are ignored by the loss.
Explicit masks may be passed instead.

Decoding keeps a K/V cache: each step attends with Lq = 1 against the cached keys
(self-attention) and the encoder memory's keys, computed once (cross-attention). By default
the self-attention cache is paged (PagedKVCache): fused_attn.decode_attention reads it
through a block table, and beam search shares the pages of common prefixes among beams
(copied only when a beam writes into a shared page). page_size=None keeps one contiguous
(B, h, L, d_k) tensor per layer and attends with scaled_dot_product_attention.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fused_attn

from ..nn import FeedForward, LayerNorm


def subsequent_mask(size: int, device=None) -> Tensor:
    """(1, size, size) bool: position i may attend to j <= i (True = allowed)."""
    return torch.ones(1, size, size, dtype=torch.bool, device=device).tril()


class PositionalEncoding(nn.Module):
    """Sinusoidal positions (a fixed buffer) or learned ones, added to (B, L, d_model), then dropout."""

    def __init__(self, d_model: int, dropout: float, max_len: int = 4096, learned: bool = False):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.learned = learned
        if learned:
            self.pe = nn.Embedding(max_len, d_model)
        else:
            position = torch.arange(max_len).unsqueeze(1)
            div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
            pe = torch.zeros(max_len, d_model)
            pe[:, 0::2] = torch.sin(position * div)
            pe[:, 1::2] = torch.cos(position * div[: d_model // 2])
            self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: Tensor, offset: int = 0, positions: Optional[Tensor] = None) -> Tensor:
        """x (B, L, d_model) at positions offset .. offset + L - 1, or at `positions` (L,)."""
        L = x.size(1)
        table = self.pe.weight if self.learned else self.pe
        pe = table[offset:offset + L] if positions is None else table[positions]
        return self.dropout(x + pe.to(x.dtype))


class Embeddings(nn.Module):
    """Token embeddings scaled by sqrt(d_model)."""

    def __init__(self, vocab: int, d_model: int, pad_id: Optional[int] = None):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model, padding_idx=pad_id)
        self.d_model = d_model

    def forward(self, x: Tensor) -> Tensor:
        return self.lut(x) * math.sqrt(self.d_model)


class PagedKVCache:
    """The self-attention keys and values of every decoder layer in pages of page_size tokens:
    a pool (num_pages, page_size, h, d_k) per layer for keys and one for values, and one block
    table for all layers (sequence b's j-th page_size tokens live in page table[b][j]). Pages
    are reference counted: after beam search reorders the sequences, beams that share a prefix
    share its pages; a shared page is copied before a sequence writes into it (copy on write).
    Every sequence holds `length` tokens."""

    def __init__(self, batch: int, page_size: int, layers: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.length = 0
        self.rows: list[list[int]] = [[] for _ in range(batch)]  # pages of each sequence
        self.refs: list[int] = []  # sequences using each page
        self.pools: list[Optional[tuple[Tensor, Tensor]]] = [None] * layers
        self.copies: list[tuple[int, int]] = []  # (from, to) pages every layer copies at its next append
        self.block_table: Optional[Tensor] = None
        self.seqlens: Optional[Tensor] = None
        self._write_pages: Optional[Tensor] = None
        self._write_slots: Optional[Tensor] = None

    @property
    def pages_in_use(self) -> int:
        return sum(1 for r in self.refs if r > 0)

    def _allocate(self) -> int:
        for page, refs in enumerate(self.refs):
            if refs == 0:
                self.refs[page] = 1
                return page
        self.refs.append(1)
        return len(self.refs) - 1

    def reserve(self, t: int, device) -> None:
        """Makes room for t more tokens in every sequence; the layers then append() them."""
        page = self.page_size
        copies = []
        for row in self.rows:
            if self.length % page and self.refs[row[-1]] > 1:  # a shared, partly filled page: copy it
                fresh = self._allocate()
                copies.append((row[-1], fresh))
                self.refs[row[-1]] -= 1
                row[-1] = fresh
            while len(row) * page < self.length + t:
                row.append(self._allocate())
        positions = torch.arange(self.length, self.length + t)
        table = torch.tensor(self.rows, dtype=torch.int32)
        self._write_pages = table[:, positions // page].long().flatten().to(device)  # (B * t,)
        self._write_slots = (positions % page).repeat(len(self.rows)).to(device)
        self.copies = copies
        self.length += t
        self.block_table = table.to(device)
        self.seqlens = torch.full((len(self.rows),), self.length, dtype=torch.int32, device=device)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes layer's (B, h, t, d_k) new keys and values at the reserved slots -> its pools."""
        if self.pools[layer] is None or self.pools[layer][0].size(0) < len(self.refs):
            size = max(len(self.refs), 2 * (self.pools[layer][0].size(0) if self.pools[layer] else 0))
            new = tuple(x.new_zeros(size, self.page_size, *x.shape[1:2], x.size(3)) for x in (k, v))
            if self.pools[layer] is not None:
                for old, grown in zip(self.pools[layer], new):
                    grown[:old.size(0)] = old
            self.pools[layer] = new
        k_pool, v_pool = self.pools[layer]
        if self.copies:
            src, dst = (torch.tensor(x, device=k.device) for x in zip(*self.copies))
            k_pool[dst], v_pool[dst] = k_pool[src], v_pool[src]
        k_pool[self._write_pages, self._write_slots] = k.transpose(1, 2).flatten(0, 1)
        v_pool[self._write_pages, self._write_slots] = v.transpose(1, 2).flatten(0, 1)
        return k_pool, v_pool

    def reorder(self, index: Tensor) -> None:
        """Keep sequences `index` (beam search): rows are copied, pages shared, counts redone."""
        self.rows = [list(self.rows[i]) for i in index.tolist()]
        self.refs = [0] * len(self.refs)
        for row in self.rows:
            for page in row:
                self.refs[page] += 1


@dataclass
class LayerCache:
    """One decoder layer's cache: self-attention K/V, either in the shared PagedKVCache (paged,
    this layer's index) or contiguous (B, h, capacity, d_k) filled up to `length`, and the
    encoder memory's cross-attention K/V."""

    self_k: Optional[Tensor] = None
    self_v: Optional[Tensor] = None
    length: int = 0
    cross_k: Optional[Tensor] = None
    cross_v: Optional[Tensor] = None
    paged: Optional[PagedKVCache] = None
    index: int = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds (B, h, t, d_k) keys/values; returns views of everything cached so far (contiguous)
        or this layer's page pools (paged)."""
        if self.paged is not None:
            return self.paged.append(self.index, k, v)
        t = k.size(2)
        if self.self_k is None or self.length + t > self.self_k.size(2):
            capacity = max(16, 2 * (self.length + t))
            grow = lambda old, new: torch.cat([old[:, :, :self.length], new.new_zeros(  # noqa: E731
                *new.shape[:2], capacity - self.length, new.shape[3])], 2) if old is not None else new.new_zeros(
                *new.shape[:2], capacity, new.shape[3])
            self.self_k, self.self_v = grow(self.self_k, k), grow(self.self_v, v)
        self.self_k[:, :, self.length:self.length + t] = k
        self.self_v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.self_k[:, :, :self.length], self.self_v[:, :, :self.length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search); a paged cache reorders once, in DecoderCache."""
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


@dataclass
class DecoderCache:
    layers: list = field(default_factory=list)
    paged: Optional[PagedKVCache] = None

    @property
    def length(self) -> int:
        if self.paged is not None:
            return self.paged.length
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)
        if self.paged is not None:
            self.paged.reorder(index)


@dataclass
class Packing:
    """Sequences packed along one row without padding (a (1, T) batch): the attention mask
    argument that makes every attention run as fused_attn.varlen_attention. cu_seqlens_q /
    cu_seqlens_k (N + 1,) int32 bound sequence i's queries / keys (cross-attention: target
    queries, source keys); causal: bottom-right aligned within each sequence."""
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_q: int
    max_k: int
    causal: bool = False

    @staticmethod
    def of(lengths: Tensor, device=None) -> "Packing":
        """The self-attention packing of sequences with these lengths (N,)."""
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        m = int(lengths.max()) if lengths.numel() else 0
        return Packing(cu, cu, m, m)

    def positions(self) -> Tensor:
        """(T,) each query's position within its own sequence."""
        cu = self.cu_seqlens_q.long()
        lengths = cu[1:] - cu[:-1]
        starts = torch.repeat_interleave(cu[:-1], lengths)
        return torch.arange(int(cu[-1]), device=cu.device) - starts


class MultiHeadedAttention(nn.Module):
    """Multi-head attention with one fused QKV projection (self-attention) or a Q and a
    fused KV projection (cross-attention), on fused_attn.scaled_dot_product_attention."""

    def __init__(self, h: int, d_model: int, dropout: float, *, cross: bool, backend: str):
        super().__init__()
        if d_model % h:
            raise ValueError(f"d_model ({d_model}) must be a multiple of the number of heads h ({h})")
        self.h, self.d_k, self.cross = h, d_model // h, cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.backend = backend
        self.context_parallel = False  # EncoderDecoder.context_parallel(group) sets it
        self.context_group = None

    def _heads(self, x: Tensor, n: int) -> tuple[Tensor, ...]:
        """(B, L, n*d_model) -> n tensors (B, h, L, d_k): strided views, no copies."""
        B, L, _ = x.shape
        return tuple(x.view(B, L, n, self.h, self.d_k).permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, mask=None, is_causal: bool = False,
                cache: Optional[LayerCache] = None) -> Tensor:
        B, L, d_model = x.shape
        if self.cross:
            (q,) = self._heads(self.q_proj(x), 1)
            if cache is not None and cache.cross_k is not None:
                k, v = cache.cross_k, cache.cross_v
            else:
                k, v = self._heads(self.kv_proj(memory), 2)
                if cache is not None:
                    cache.cross_k, cache.cross_v = k, v
        else:
            q, k, v = self._heads(self.qkv_proj(x), 3)
            if cache is not None and cache.paged is not None:
                if mask is not None:
                    raise NotImplementedError("a paged cache attends causally (or fully) over the cached keys; "
                                              "an explicit self-attention mask needs new_cache(page_size=None)")
                return self._decode_paged(q, k, v, cache, is_causal)
            if cache is not None:
                k, v = cache.append(k, v)
                if is_causal and L > 1:  # several new queries against a longer cache: align bottom-right
                    mask, is_causal = torch.nn.attention.bias.causal_lower_right(L, k.size(2)), False
                elif is_causal:  # one new query sees every cached key
                    is_causal = False
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, Packing):  # x (1, T, d_model): packed sequences, no padding anywhere
            if dropout_p > 0:
                raise NotImplementedError("packed (varlen) attention has no dropout; train packed with dropout 0")
            out = fused_attn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                              mask.cu_seqlens_q, mask.cu_seqlens_k, mask.max_q, mask.max_k,
                                              is_causal=mask.causal, backend=self.backend)
            return self.out_proj(out.reshape(B, L, d_model))
        if self.context_parallel and cache is None:
            # x and memory are this rank's slices (the zigzag layout); mask is their key padding
            from ..distributed import ring_attention

            out = ring_attention(q, k, v, group=self.context_group, is_causal=is_causal, attn_mask=mask,
                                 dropout_p=dropout_p, backend=self.backend)
        else:
            out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                          is_causal=is_causal, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d_model))


    def _decode_paged(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, is_causal: bool) -> Tensor:
        """q, k, v (B, h, L, d_k) of the new tokens: k, v join the paged cache, q attends to it
        with fused_attn.decode_attention (causal among the new tokens, bottom-right aligned)."""
        if self.training and self.dropout > 0:
            raise NotImplementedError("decoding with a paged cache has no attention dropout: call model.eval() "
                                      "first, or decode with page_size=None")
        B, _, L, _ = q.shape
        k_pool, v_pool = cache.append(k, v)
        paged = cache.paged
        from ..ops import decode as decode_op

        # the model's backend when it has a decode kernel, else the best one here (cuda: triton)
        backend = self.backend if self.backend in decode_op.OP.entries else "auto"
        out = fused_attn.decode_attention(q.transpose(1, 2), k_pool, v_pool, paged.seqlens,
                                          block_table=paged.block_table, is_causal=is_causal, backend=backend)
        return self.out_proj(out.reshape(B, L, self.h * self.d_k))


@dataclass(frozen=True)
class LayerConfig:
    """What every encoder and decoder layer is built from."""
    d_model: int = 512
    h: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    norm: str = "pre"             # "pre" (LayerNorm before each sublayer) or "post" (the paper's)
    activation: str = "relu"      # the feed-forward's
    backend: str = "auto"         # fused_attn's backend for every op

    def __post_init__(self):
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")


class Residual(NamedTuple):
    """The residual stream with at most one add still to do: its value is stream + delta
    (delta None: nothing pending). The add is left for the next LayerNorm, which fuses it."""
    stream: Tensor
    delta: Optional[Tensor] = None


class SublayerConnection(nn.Module):
    """A residual connection around a sublayer: pre-norm, x + dropout(sublayer(norm(x))); post-norm
    (the paper), norm(x + dropout(sublayer(x))). The residual add is fused into the LayerNorm that
    follows it, so with pre-norm the add of dropout(sublayer(...)) stays pending in the returned
    Residual until the next sublayer's (or the stack's final) LayerNorm performs it as
    LN(delta, residual=stream)."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.d_model, backend=cfg.backend)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre = cfg.norm == "pre"

    def forward(self, x: Residual, sublayer) -> Residual:
        if not self.pre:
            return Residual(self.norm(self.drop(sublayer(x.stream)), residual=x.stream))
        if x.delta is None:
            y, stream = self.norm(x.stream), x.stream
        else:
            y, stream = self.norm(x.delta, residual=x.stream, return_residual=True)
        return Residual(stream, self.drop(sublayer(y)))


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each in a SublayerConnection."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.self_attn = MultiHeadedAttention(cfg.h, cfg.d_model, cfg.dropout, cross=False, backend=cfg.backend)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=cfg.dropout,
                                        backend=cfg.backend)
        self.self_attn_sublayer = SublayerConnection(cfg)
        self.feed_forward_sublayer = SublayerConnection(cfg)

    def forward(self, x: Residual, mask) -> Residual:
        x = self.self_attn_sublayer(x, lambda y: self.self_attn(y, mask=mask))
        return self.feed_forward_sublayer(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder's memory and feed-forward, each in a
    SublayerConnection."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.self_attn = MultiHeadedAttention(cfg.h, cfg.d_model, cfg.dropout, cross=False, backend=cfg.backend)
        self.cross_attn = MultiHeadedAttention(cfg.h, cfg.d_model, cfg.dropout, cross=True, backend=cfg.backend)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=cfg.dropout,
                                        backend=cfg.backend)
        self.self_attn_sublayer = SublayerConnection(cfg)
        self.cross_attn_sublayer = SublayerConnection(cfg)
        self.feed_forward_sublayer = SublayerConnection(cfg)

    def forward(self, x: Residual, memory, src_mask, tgt_mask, cache: Optional[LayerCache] = None) -> Residual:
        causal = tgt_mask is None or (isinstance(tgt_mask, Packing) and tgt_mask.causal)
        if isinstance(src_mask, Packing):  # cross-attention: target queries against source keys
            src_mask = Packing(tgt_mask.cu_seqlens_q, src_mask.cu_seqlens_k, tgt_mask.max_q, src_mask.max_k)
        x = self.self_attn_sublayer(x, lambda y: self.self_attn(y, mask=tgt_mask, is_causal=causal, cache=cache))
        x = self.cross_attn_sublayer(x, lambda y: self.cross_attn(y, memory=memory, mask=src_mask, cache=cache))
        return self.feed_forward_sublayer(x, self.feed_forward)


class _Stack(nn.Module):
    """N layers and the final LayerNorm (pre-norm) or the last sublayer's LayerNorm (post-norm)."""

    def __init__(self, layer: nn.Module, n: int, cfg: LayerConfig):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n))
        # pre-norm ends with a LayerNorm of the stream (performing the last pending add);
        # post-norm's last sublayer already normalised it
        self.final_norm = LayerNorm(cfg.d_model, backend=cfg.backend) if cfg.norm == "pre" else None

    def finish(self, x: Residual) -> Tensor:
        if self.final_norm is None:
            return x.stream
        return self.final_norm(x.delta, residual=x.stream) if x.delta is not None else self.final_norm(x.stream)


class Encoder(_Stack):
    """N EncoderLayers: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, cfg: LayerConfig, n: int):
        super().__init__(EncoderLayer(cfg), n, cfg)

    def forward(self, x: Tensor, mask) -> Tensor:
        r = Residual(x)
        for layer in self.layers:
            r = layer(r, mask)
        return self.finish(r)


class Decoder(_Stack):
    """N DecoderLayers: (B, Lt, d_model) and memory (B, Ls, d_model) -> (B, Lt, d_model)."""

    def __init__(self, cfg: LayerConfig, n: int):
        super().__init__(DecoderLayer(cfg), n, cfg)

    def forward(self, x, memory, src_mask, tgt_mask, cache: Optional[DecoderCache] = None) -> Tensor:
        r = Residual(x)
        for i, layer in enumerate(self.layers):
            r = layer(r, memory, src_mask, tgt_mask, cache.layers[i] if cache is not None else None)
        return self.finish(r)


class Generator(nn.Module):
    """Linear projection to the vocabulary + log_softmax."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.proj(x).float(), dim=-1)


class EncoderDecoder(nn.Module):
    """model(src (B, Ls), tgt (B, Lt)) -> log-probabilities (B, Lt, tgt_vocab)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, N: int = 6, d_model: int = 512, d_ff: int = 2048, h: int = 8,
                 dropout: float = 0.1, *, pad_id: int = 0, backend: str = "auto", norm: str = "pre",
                 positional: str = "sinusoidal", activation: str = "relu", tie_weights: bool = False,
                 max_len: int = 4096):
        super().__init__()
        cfg = LayerConfig(d_model, h, d_ff, dropout, norm, activation, backend)
        if positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional must be 'sinusoidal' or 'learned', got {positional!r}")
        self.pad_id = pad_id
        self.backend = backend
        self.src_embed = Embeddings(src_vocab, d_model, pad_id)
        self.tgt_embed = Embeddings(tgt_vocab, d_model, pad_id)
        self.src_pos = PositionalEncoding(d_model, dropout, max_len, learned=positional == "learned")
        self.tgt_pos = PositionalEncoding(d_model, dropout, max_len, learned=positional == "learned")
        self.encoder = Encoder(cfg, N)
        self.decoder = Decoder(cfg, N)
        self.generator = Generator(d_model, tgt_vocab)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if tie_weights:
            self.generator.proj.weight = self.tgt_embed.lut.weight

    # ---------------------------------------------------------------- masks

    def src_mask(self, src: Tensor) -> Tensor:
        """(B, 1, 1, Ls) bool: True where the source token is not padding."""
        return (src != self.pad_id)[:, None, None, :]

    # ---------------------------------------------------------------- forward

    def encode(self, src: Tensor, src_mask=None, src_positions: Optional[Tensor] = None) -> Tensor:
        """src (B, Ls) -> memory (B, Ls, d_model); src_positions (Ls,): the tokens' positions
        (default 0 .. Ls - 1; under context parallelism, this rank's zigzag positions)."""
        mask = self.src_mask(src) if src_mask is None else src_mask
        return self.encoder(self.src_pos(self.src_embed(src), positions=src_positions), mask)

    def decode(self, memory: Tensor, src_mask, tgt: Tensor, tgt_mask=None,
               cache: Optional[DecoderCache] = None, tgt_positions: Optional[Tensor] = None) -> Tensor:
        """tgt (B, Lt) -> decoder output (B, Lt, d_model); with a cache, tgt holds only the new tokens."""
        offset = cache.length if cache is not None else 0
        if cache is not None and cache.paged is not None:
            cache.paged.reserve(tgt.size(1), tgt.device)
        return self.decoder(self.tgt_pos(self.tgt_embed(tgt), offset, tgt_positions), memory, src_mask, tgt_mask,
                            cache)

    def forward(self, src: Tensor, tgt: Tensor, src_mask=None, tgt_mask=None, *,
                src_positions: Optional[Tensor] = None, tgt_positions: Optional[Tensor] = None,
                src_lengths: Optional[Tensor] = None, tgt_lengths: Optional[Tensor] = None) -> Tensor:
        """src (B, Ls), tgt (B, Lt) -> log-probabilities (B, Lt, tgt_vocab); with src_lengths and
        tgt_lengths (N,), src (Ts,) and tgt (Tt,) are packed sequences: forward_packed."""
        if src_lengths is not None or tgt_lengths is not None:
            return self.forward_packed(src, src_lengths, tgt, tgt_lengths)
        src_mask = self.src_mask(src) if src_mask is None else src_mask
        memory = self.encode(src, src_mask, src_positions)
        return self.generator(self.decode(memory, src_mask, tgt, tgt_mask, tgt_positions=tgt_positions))

    def forward_packed(self, src: Tensor, src_lengths: Tensor, tgt: Tensor, tgt_lengths: Tensor) -> Tensor:
        """Packed sequences, no padding: src (Ts,) and tgt (Tt,) token ids of N sequences laid end
        to end with lengths src_lengths / tgt_lengths (N,) -> log-probabilities (Tt, tgt_vocab).
        Every attention runs as varlen_attention (each sequence on its own; the decoder's
        self-attention causal), positions restart at 0 per sequence: the padded batch's
        log-probabilities at its real positions."""
        src_pack = Packing.of(src_lengths, src.device)
        tgt_pack = Packing.of(tgt_lengths, tgt.device)
        tgt_pack.causal = True
        memory = self.encoder(self.src_pos(self.src_embed(src[None]), positions=src_pack.positions()), src_pack)
        out = self.decoder(self.tgt_pos(self.tgt_embed(tgt[None]), positions=tgt_pack.positions()), memory, src_pack,
                           tgt_pack)
        return self.generator(out)[0]

    def context_parallel(self, group=None, enabled: bool = True) -> None:
        """Run every attention as ring attention over `group` (fused_attn.distributed): each rank
        then passes its zigzag slice of src and tgt (zigzag_shard, padded with pad_id) with their
        positions (zigzag_positions); the source padding mask travels with the keys. Decoding
        with a cache always runs locally. enabled=False turns it off."""
        for m in self.modules():
            if isinstance(m, MultiHeadedAttention):
                m.context_parallel, m.context_group = enabled, group

    # ---------------------------------------------------------------- decoding

    def new_cache(self, batch: Optional[int] = None, page_size: Optional[int] = 16) -> DecoderCache:
        """An empty decoding cache for `batch` sequences: self-attention K/V in pages of page_size
        tokens (PagedKVCache, read by fused_attn.decode_attention), or contiguous per layer with
        page_size=None (batch may then be None)."""
        n = len(self.decoder.layers)
        if page_size is None:
            return DecoderCache([LayerCache() for _ in range(n)])
        if batch is None:
            raise ValueError("a paged cache needs the batch size: new_cache(batch, page_size)")
        paged = PagedKVCache(batch, page_size, n)
        return DecoderCache([LayerCache(paged=paged, index=i) for i in range(n)], paged)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int, start_id: int, end_id: Optional[int] = None,
                      use_cache: bool = True, page_size: Optional[int] = 16) -> Tensor:
        """Greedy decoding: (B, Ls) -> (B, <= max_len) token ids starting with start_id.

        With use_cache each step feeds only the newest token (Lq = 1) against the K/V cache
        (paged, page_size tokens a page; None: contiguous); without it the whole prefix is
        decoded again every step (same result, slower)."""
        src_mask = self.src_mask(src)
        memory = self.encode(src, src_mask)
        ys = torch.full((src.size(0), 1), start_id, dtype=torch.long, device=src.device)
        cache = self.new_cache(src.size(0), page_size) if use_cache else None
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            out = self.decode(memory, src_mask, ys[:, -1:] if use_cache else ys, cache=cache)
            next_word = self.generator(out[:, -1]).argmax(dim=-1)
            if end_id is not None:
                next_word = next_word.masked_fill(done, end_id if end_id is not None else 0)
                done |= next_word == end_id
            ys = torch.cat([ys, next_word[:, None]], dim=1)
            if end_id is not None and bool(done.all()):
                break
        return ys

    @torch.no_grad()
    def beam_search(self, src: Tensor, max_len: int, start_id: int, end_id: int, beam_size: int = 4,
                    length_penalty: float = 0.6, page_size: Optional[int] = 16) -> Tensor:
        """Beam search with the K/V cache (reordered as beams move; paged: beams share the pages
        of their common prefix): (B, Ls) -> (B, <= max_len), the best hypothesis of each source by
        log-probability / ((5 + len) / 6)^length_penalty."""
        B = src.size(0)
        src = src.repeat_interleave(beam_size, 0)
        src_mask = self.src_mask(src)
        memory = self.encode(src, src_mask)
        cache = self.new_cache(B * beam_size, page_size)
        ys = torch.full((B * beam_size, 1), start_id, dtype=torch.long, device=src.device)
        scores = torch.zeros(B, beam_size, device=src.device)
        scores[:, 1:] = -math.inf  # all beams start identical: keep one
        finished = torch.zeros(B * beam_size, dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            logp = self.generator(self.decode(memory, src_mask, ys[:, -1:], cache=cache)[:, -1])  # (B*k, V)
            V = logp.size(-1)
            # a finished hypothesis only extends with end_id, at no cost
            logp = torch.where(finished[:, None], torch.full_like(logp, -math.inf), logp)
            logp[:, end_id] = torch.where(finished, torch.zeros_like(logp[:, end_id]), logp[:, end_id])
            total = (scores.view(-1, 1) + logp).view(B, beam_size * V)
            scores, flat = total.topk(beam_size, dim=-1)
            beam, word = flat // V, flat % V
            index = (torch.arange(B, device=src.device)[:, None] * beam_size + beam).view(-1)
            cache.reorder(index)
            ys = torch.cat([ys.index_select(0, index), word.view(-1, 1)], dim=1)
            finished = finished.index_select(0, index) | (word.view(-1) == end_id)
            if bool(finished.all()):
                break
        lengths = ((ys != end_id).cumsum(1) == torch.arange(1, ys.size(1) + 1, device=ys.device)).sum(1) + 1
        penalty = ((5.0 + lengths.float()) / 6.0) ** length_penalty
        best = (scores.view(-1) / penalty).view(B, beam_size).argmax(dim=-1)
        return ys.view(B, beam_size, -1)[torch.arange(B, device=ys.device), best]


def make_model(src_vocab: int, tgt_vocab: int, N: int = 6, d_model: int = 512, d_ff: int = 2048, h: int = 8,
               dropout: float = 0.1, *, pad_id: int = 0, backend: str = "auto", **kwargs) -> EncoderDecoder:
    """The encoder-decoder Transformer (base size by default) on the fused ops.

    kwargs: norm ('pre' | 'post'), positional ('sinusoidal' | 'learned'), activation,
    tie_weights, max_len."""
    return EncoderDecoder(src_vocab, tgt_vocab, N, d_model, d_ff, h, dropout, pad_id=pad_id, backend=backend,
                          **kwargs)
