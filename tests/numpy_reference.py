"""An independent OpenELM forward pass in NumPy, written from the architecture description.

It shares no code with ``mlx_openelm``: it reads HF-named weights and the HF ``config.json`` fields, and
derives per-layer FFN widths from the weight shapes. ``round_to`` emulates a 16-bit model the way Apple's
reference runs one: weights and every matmul output (the logits included) are rounded, RMSNorm and RoPE are computed in
float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float) -> np.ndarray:
    # x: [B, H, L, D]; non-interleaved ("rotate half") rotary embedding over the full head dim.
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.arange(x.shape[2], dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def forward(
    weights: dict[str, np.ndarray],
    config: dict,
    tokens: np.ndarray,
    round_to: Callable[[np.ndarray], np.ndarray] = _identity,
) -> np.ndarray:
    """Logits ``[B, L, vocab]`` in float32 for ``tokens [B, L]``."""
    w = {k: round_to(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
    eps = config.get("rms_norm_eps", 1e-6)
    base = config.get("rope_freq_constant", 10000)
    hd = config["head_dim"]
    emb = w["transformer.token_embeddings.weight"]
    x = emb[tokens]
    B, L, _ = x.shape
    causal = np.triu(np.full((L, L), -np.inf, dtype=np.float32), 1)
    for i in range(config["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nkv = config["num_query_heads"][i], config["num_kv_heads"][i]
        h = round_to(_rms_norm(x, w[p + "attn_norm.weight"], eps))
        qkv = round_to(h @ w[p + "attn.qkv_proj.weight"].T).reshape(B, L, nq + 2 * nkv, hd).transpose(0, 2, 1, 3)
        q, k, v = qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :]
        q = round_to(_rope(_rms_norm(q, w[p + "attn.q_norm.weight"], eps), base))
        k = round_to(_rope(_rms_norm(k, w[p + "attn.k_norm.weight"], eps), base))
        group = nq // nkv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head j uses KV head j // group
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = round_to(probs @ v).transpose(0, 2, 1, 3).reshape(B, L, nq * hd)
        x = round_to(x + round_to(attn @ w[p + "attn.out_proj.weight"].T))
        h = round_to(_rms_norm(x, w[p + "ffn_norm.weight"], eps))
        gate, up = np.split(round_to(h @ w[p + "ffn.proj_1.weight"].T), 2, axis=-1)
        act = round_to(gate / (1 + np.exp(-gate)) * up)
        x = round_to(x + round_to(act @ w[p + "ffn.proj_2.weight"].T))
    h = round_to(_rms_norm(x, w["transformer.norm.weight"], eps))
    return round_to(h @ emb.T)  # a 16-bit model's logits are 16-bit too (Apple's reference casts them after)
