"""timm Vision Transformers for 32x32 images (patch 4: 64 patches + class token).

The models are plain timm `VisionTransformer`s; only the attention and MLP classes are
swapped for subclasses whose forward skips dead heads and neurons. Parameter names and
shapes are timm's, so state dicts load into timm and back.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer

from vitprune.kernels import reference

# name -> (embed_dim, depth, num_heads, mlp_ratio)
MODEL_SPECS = {
    "vit_micro": (64, 4, 4, 2.0),    # CPU demos and tests
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),  # the seed's model: 21.3M parameters
    "vit_base": (768, 12, 12, 4.0),
}


class PrunableAttention(Attention):
    """timm Attention that computes only the alive heads.

    `qkv_rows` / `proj_cols` index the q, k, v rows of `qkv` and the columns of `proj` that
    belong to alive heads (None = all heads alive); `qkv_mask` / `proj_mask` are element
    masks (unstructured pruning). Dead heads are never computed: attention runs over the
    alive heads only and their outputs feed `proj` through its alive columns.
    """
    qkv_rows: Optional[torch.Tensor] = None
    proj_cols: Optional[torch.Tensor] = None
    qkv_mask: Optional[torch.Tensor] = None
    proj_mask: Optional[torch.Tensor] = None
    linear = staticmethod(reference.masked_linear)
    observe = None  # callable(module, head_outputs) for activation criteria; None in training

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        heads = self.num_heads if self.qkv_rows is None else self.qkv_rows.numel() // (3 * self.head_dim)
        qkv = self.linear(x, self.qkv.weight, self.qkv.bias, live_out=self.qkv_rows, mask=self.qkv_mask)
        q, k, v = qkv.reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, heads * self.head_dim)
        if self.observe is not None:
            self.observe(self, x)
        x = self.linear(x, self.proj.weight, self.proj.bias, live_in=self.proj_cols, mask=self.proj_mask)
        return self.proj_drop(x)


class PrunableMlp(Mlp):
    """timm Mlp that computes only the alive hidden neurons (`live`: index tensor or None)."""
    live: Optional[torch.Tensor] = None
    fc1_mask: Optional[torch.Tensor] = None
    fc2_mask: Optional[torch.Tensor] = None
    linear = staticmethod(reference.masked_linear)
    observe = None

    def forward(self, x):
        x = self.linear(x, self.fc1.weight, self.fc1.bias, live_out=self.live, mask=self.fc1_mask)
        x = self.drop1(self.act(x))
        if self.observe is not None:
            self.observe(self, x)
        x = self.linear(x, self.fc2.weight, self.fc2.bias, live_in=self.live, mask=self.fc2_mask)
        return self.drop2(x)


def build_model(name: str, num_classes: int, img_size: int = 32, patch_size: int = 4) -> VisionTransformer:
    """A timm VisionTransformer for `img_size` inputs whose heads and neurons can be pruned."""
    dim, depth, heads, mlp_ratio = MODEL_SPECS[name]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                             embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                             qkv_bias=True, attn_layer=PrunableAttention, mlp_layer=PrunableMlp)


def set_kernels(model: VisionTransformer, masked_linear) -> None:
    """Route every prunable linear of the model through `masked_linear` (a kernel backend)."""
    for block in model.blocks:
        block.attn.linear = masked_linear
        block.mlp.linear = masked_linear
