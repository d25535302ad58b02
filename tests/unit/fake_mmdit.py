"""A joint-attention block following ComfyUI's MMDiT / Flux protocol, in plain torch.

Text and image have their own QKV and output projections; one attention runs over
[text | image] through an `optimized_attention_override` when transformer_options has one,
as comfy.ldm.modules.attention.wrap_attn does. `layout="flux"` passes (B, heads, L, d) with
skip_reshape=True like comfy.ldm.flux.math.attention; `layout="sd3"` passes (B, L, heads * d)
like mmdit's _block_mixing.
"""

import torch
import torch.nn.functional as F


def sdpa(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch: float masks (B, L, L) or (B, heads, L, L) are added to the logits."""
    if skip_reshape:
        b, _, length, d = q.shape
    else:
        b, length, inner = q.shape
        d = inner // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def attention(q, k, v, heads, transformer_options=None, **kwargs):
    override = (transformer_options or {}).get("optimized_attention_override")
    if override is not None:
        return override(sdpa, q, k, v, heads, transformer_options=transformer_options, **kwargs)
    return sdpa(q, k, v, heads, **kwargs)


class JointBlock(torch.nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, layout: str = "flux", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads, self.layout = heads, layout
        self.txt_qkv = torch.nn.Linear(dim, 3 * dim)
        self.img_qkv = torch.nn.Linear(dim, 3 * dim)
        self.txt_out = torch.nn.Linear(dim, dim)
        self.img_out = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))

    def forward(self, txt: torch.Tensor, img: torch.Tensor, transformer_options: dict):
        t = txt.shape[1]
        qkv = torch.cat([self.txt_qkv(txt), self.img_qkv(img)], dim=1)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.layout == "flux":
            b, length, inner = q.shape
            q, k, v = (x.view(b, length, self.heads, -1).transpose(1, 2) for x in (q, k, v))
            out = attention(q, k, v, self.heads, skip_reshape=True, mask=None, transformer_options=transformer_options)
        else:
            out = attention(q, k, v, self.heads, transformer_options=transformer_options)
        return self.txt_out(out[:, :t]), self.img_out(out[:, t:])
