"""The OpenELM network in MLX: token ids in, logits out.

Module names equal the Hugging Face checkpoint's tensor names, so conversion is a dtype cast.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import ModelArgs


class RMSNorm(nn.Module):
    """RMSNorm through the fused kernel (the paper's slowdown came from an unfused one)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm before RoPE; this layer's own head counts."""

    def __init__(self, dim: int, head_dim: int, n_heads: int, n_kv_heads: int, eps: float, rope_base: float):
        super().__init__()
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        self.scale = head_dim**-0.5
        self.rope_base = rope_base
        self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        # q/k RMSNorm and RoPE in float32, rounded once: a 16-bit rounding between them raised the bfloat16
        # logit error about 1.25x over a reference that keeps both in float32.
        q, k = self.q_norm(q.astype(mx.float32)), self.k_norm(k.astype(mx.float32))
        offset = 0 if cache is None else cache.offset
        q, k = self._rope(q, offset).astype(v.dtype), self._rope(k, offset).astype(v.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # Native GQA: the kernel maps each KV head to its query group; K/V are never repeated.
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``proj_1`` holds [gate; up] stacked, ``proj_2`` projects back."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.proj_1 = nn.Linear(dim, 2 * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)
        return self.proj_2(nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        dim, eps = args.model_dim, args.rms_norm_eps
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(
            dim,
            args.head_dim,
            args.num_query_heads[layer],
            args.num_kv_heads[layer],
            eps,
            args.rope_freq_constant,
        )
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = FeedForward(dim, args.ffn_dims[layer])

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        # ``x`` is the float32 residual stream; each branch runs in the weights' dtype.
        dtype = self.attn_norm.weight.dtype
        h = x + self.attn(self.attn_norm(x).astype(dtype), mask, cache)
        return h + self.ffn(self.ffn_norm(h).astype(dtype))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = RMSNorm(args.model_dim, args.rms_norm_eps)


class Model(nn.Module):
    """OpenELM. ``model(tokens[B, L], cache=None) -> logits[B, L, vocab]``; the output head is tied."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = Transformer(args)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        t = self.transformer
        h = t.token_embeddings(inputs)
        dtype = h.dtype
        # The residual stream stays float32 in a 16-bit model: rounding it after every block made the
        # bfloat16 logit error larger than Apple's reference's (benchmarks/quant_quality.py measures it).
        h = h.astype(mx.float32)
        caches = cache if cache is not None else [None] * len(t.layers)
        mask = create_attention_mask(h, caches[0])
        for layer, c in zip(t.layers, caches):
            h = layer(h, mask, c)
        return t.token_embeddings.as_linear(t.norm(h).astype(dtype))

    @property
    def layers(self) -> list[TransformerBlock]:
        """The transformer blocks (mlx-lm's cache factory counts them)."""
        return self.transformer.layers
