"""Drop-in nn modules backed by the fused ops.

Each keeps the constructor, parameters and state_dict keys of its torch counterpart, so
``load_state_dict`` works both ways, and adds a ``backend`` ("auto" by default).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import fused_attn

__all__ = ["LayerNorm", "FeedForward", "MultiheadAttention"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fused kernels, with an optional fused residual add.

    forward(input (..., *normalized_shape), residual=None, return_residual=False):
    normalises input (+ residual); returns y, or (y, input + residual) with return_residual.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False):
        return fused_attn.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
                                     return_residual=return_residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class FeedForward(torch.nn.Module):
    """The position-wise feed-forward block act(x W1^T + b1) W2^T + b2 as one fused op.

    forward(x (..., d_model), residual=None) -> (..., d_model). Parameters are two
    nn.Linear layers (w_1: d_model -> d_ff, w_2: d_ff -> d_model); ``dropout`` acts on
    the hidden activation while training.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        fused_attn._checks.feed_forward(torch.empty(1, d_model), torch.empty(d_ff, d_model), None,
                                        torch.empty(d_model, d_ff), None, activation, dropout, None)
        self.w_1 = torch.nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.w_2 = torch.nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.dropout = dropout
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return fused_attn.feed_forward(x, self.w_1.weight, self.w_1.bias, self.w_2.weight, self.w_2.bias,
                                       activation=self.activation, dropout_p=self.dropout if self.training else 0.0,
                                       residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d_model={self.w_1.in_features}, d_ff={self.w_1.out_features}, activation={self.activation!r}, "
                f"dropout={self.dropout}, backend={self.backend!r}")


def _to_sdpa_mask(mask: Optional[Tensor], name: str) -> Optional[Tensor]:
    """torch MHA masks (bool True = *not* allowed, or float added) as SDPA masks (bool True = allowed)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got dtype {mask.dtype}")
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on the fused attention kernels: same constructor,
    forward signature and state_dict keys.

    The fused path serves need_weights=False (what nn.Transformer* layers pass). When the
    attention weights are asked for, or for add_bias_kv / add_zero_attn, it runs torch's
    own implementation on the same parameters. One deliberate difference: a query whose
    every key is masked gets output 0, where torch gives NaN.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        fused_attn._checks.multihead_attention(query, key, value, key_padding_mask, attn_mask,
                                               embed_dim=self.embed_dim, kdim=self.kdim, vdim=self.vdim,
                                               num_heads=self.num_heads, batch_first=self.batch_first)
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint about attn_mask and needs attn_mask (as in torch)")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint says attn_mask is the causal mask: run the causal kernel instead
        else:
            is_causal = False
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1 - self.batch_first), key.unsqueeze(1 - self.batch_first), \
                value.unsqueeze(1 - self.batch_first)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        hd = E // H
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one fused projection
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        # (B, L, H*hd) -> (B, H, L, hd) as strided views: the kernels read them in place
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, S, H, hd).transpose(1, 2)
        v = v.view(B, S, H, hd).transpose(1, 2)
        mask = self._merged_mask(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        out = fused_attn.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=bool(is_causal), backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1 - self.batch_first)
        return out, None

    @staticmethod
    def _merged_mask(attn_mask, key_padding_mask, B, H, L, S, dtype) -> Optional[Tensor]:
        am = _to_sdpa_mask(attn_mask, "attn_mask")
        kpm = _to_sdpa_mask(key_padding_mask, "key_padding_mask")
        if am is not None:
            am = am.view(B, H, L, S) if am.dim() == 3 else am.view(1, 1, L, S)
        if kpm is not None:
            kpm = kpm.view(B, 1, 1, S)
        if am is None or kpm is None:
            mask = am if am is not None else kpm
        elif am.dtype == torch.bool and kpm.dtype == torch.bool:
            mask = am & kpm
        else:
            def as_float(m):
                if m.dtype != torch.bool:
                    return m.to(dtype)
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, -math.inf)
            mask = as_float(am) + as_float(kpm)
        if mask is not None and mask.dtype != torch.bool and mask.dtype != dtype:
            mask = mask.to(dtype)
        return mask
