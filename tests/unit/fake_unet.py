"""A cross-attention layer driven the way ComfyUI's BasicTransformerBlock drives attn2:
attn2_patch list, then optimized_attention_override around the attention function."""

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, heads, mask=None, **kwargs):
    """ComfyUI's attention_pytorch in miniature: (B, N, heads*d) in and out, float mask added."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(torch.nn.Module):
    def __init__(self, dim=16, context_dim=12, heads=2, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False, dtype=dtype)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False, dtype=dtype)
        with torch.no_grad():
            for lin in (self.to_q, self.to_k, self.to_v):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=dtype) / lin.weight.shape[1] ** 0.5)


def run_layer(layer, x, context, h, w, transformer_options, key=("input", 1, 0)):
    """x (B, h*w, dim), context (B, L0, context_dim): one attn2 call with ComfyUI's hook protocol."""
    to = dict(transformer_options)
    to.update(block=key[:2], block_index=key[2], activations_shape=[x.shape[0], x.shape[-1], h, w])
    extra = {k: v for k, v in to.items() if k != "patches"}
    value = context
    for p in to.get("patches", {}).get("attn2_patch", []):
        x, context, value = p(x, context, value, extra)
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(value)
    override = to.get("optimized_attention_override")
    if override is None:
        out = sdpa_attention(q, k, v, layer.heads, transformer_options=to)
    else:
        out = override(sdpa_attention, q, k, v, layer.heads, transformer_options=to)
    for p in to.get("patches", {}).get("attn2_output_patch", []):
        out = p(out, extra)
    return out
