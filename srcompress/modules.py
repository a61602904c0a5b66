"""Modules that stand in for library modules whose attributes cannot express a pruned shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadPrunedAttention(nn.Module):
    """Multi-head attention whose inner width (heads x head_dim) may differ from the embedding width.

    ``nn.MultiheadAttention`` requires ``num_heads * head_dim == embed_dim``, so it cannot hold a model with
    attention heads removed. This module computes the same function with the surviving heads, takes the
    same arguments, and returns ``(output, weights or None)`` like ``nn.MultiheadAttention``.
    """

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = num_heads, head_dim, batch_first, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.Module) -> "HeadPrunedAttention":
        """Build from an ``nn.MultiheadAttention`` whose tensors were already sliced to the kept heads."""
        head_dim = mha.embed_dim // mha.num_heads
        inner = mha.in_proj_weight.shape[0] // 3
        new = cls(mha.in_proj_weight.shape[1], inner // head_dim, head_dim, mha.out_proj.weight.shape[0],
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, dropout=mha.dropout)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = self._heads(F.linear(query, w_q, b_q)), self._heads(F.linear(key, w_k, b_k)), self._heads(F.linear(value, w_v, b_v))
        mask = self._mask(attn_mask, key_padding_mask, q)
        if is_causal and mask is None:
            length, source = q.shape[-2], k.shape[-2]
            mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, q):
        """Additive float mask of shape broadcastable to (batch, heads, length, source), or None."""
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.is_floating_point() else torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
            if mask.dim() == 3:  # (batch * heads, length, source)
                mask = mask.view(q.shape[0], -1, *mask.shape[-2:])
        if key_padding_mask is not None:
            padding = key_padding_mask if key_padding_mask.is_floating_point() else torch.zeros_like(
                key_padding_mask, dtype=q.dtype).masked_fill(key_padding_mask, float("-inf"))
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask
