"""timm Vision Transformers whose attention heads and MLP neurons can be pruned.

The model of --model (any plain timm VisionTransformer or an alias: zoo.py) is built by
`timm.create_model`, then `prunable` swaps its attention and MLP classes, in place, for
subclasses whose forward skips dead heads and neurons (vitprune.prunable does the same to a
model of yours); parameters stay timm's, same objects, names and shapes, so state dicts load
into timm and back and an optimizer built before still holds them. --pretrained weights load through timm as well: its checkpoint filter resamples
the patch and position embeddings, and the classifier is new when the classes differ.
"""
import hashlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer

from vitprune.errors import ConfigError
from vitprune.kernels import reference
from vitprune.structure import head_cols, head_rows
from vitprune.zoo import ALIASES, cannot_prune, is_weights_file, pretrained_cfg, why_not_plain


class PrunableAttention(Attention):
    """timm Attention that computes only the alive heads.

    `set_live` chooses the heads: the forward then computes q, k, v for the alive heads only
    (their rows of `qkv`), attention over those heads, and `proj` through the columns that
    read them. Element masks (unstructured pruning) multiply `qkv` and `proj`. The linears
    run through `self.linear`, a masked_linear of the kernel backend (`use_kernel`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.make_prunable()

    def make_prunable(self) -> None:
        """The state the forward adds to timm's Attention (`prunable` sets it on a swapped instance)."""
        self.linear = reference.masked_linear
        self.qkv_rows = self.proj_cols = None  # None: every head alive
        self.qkv_mask = self.proj_mask = None
        self.observer = None  # callable(module, head_outputs) for activation criteria

    def use_kernel(self, masked_linear) -> None:
        self.linear = masked_linear

    def set_live(self, heads: torch.Tensor, qkv_mask=None, proj_mask=None) -> None:
        """heads: bool [num_heads], the alive heads; masks: element masks of qkv / proj."""
        device = self.qkv.weight.device
        live = heads.nonzero().flatten().to(device)
        every = bool(heads.all())
        self.qkv_rows = None if every else head_rows(live, self.num_heads, self.head_dim)
        self.proj_cols = None if every else head_cols(live, self.head_dim)
        self.qkv_mask = None if qkv_mask is None else qkv_mask.to(device)
        self.proj_mask = None if proj_mask is None else proj_mask.to(device)

    def live_heads(self) -> torch.Tensor:
        """Indices of the heads the forward computes, in the order of its head outputs."""
        if self.proj_cols is None:
            return torch.arange(self.num_heads, device=self.qkv.weight.device)
        return self.proj_cols[::self.head_dim] // self.head_dim

    def observe(self, observer) -> None:
        """Call observer(self, head_outputs [B, N, heads·head_dim]) in every forward (None: stop)."""
        self.observer = observer

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        heads = self.num_heads if self.qkv_rows is None else self.qkv_rows.numel() // (3 * self.head_dim)
        qkv = self.linear(x, self.qkv.weight, self.qkv.bias, live_out=self.qkv_rows, mask=self.qkv_mask)
        q, k, v = qkv.reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, heads * self.head_dim))
        if self.observer is not None:
            self.observer(self, x)
        x = self.linear(x, self.proj.weight, self.proj.bias, live_in=self.proj_cols, mask=self.proj_mask)
        return self.proj_drop(x)


class PrunableMlp(Mlp):
    """timm Mlp that computes only the alive hidden neurons (see PrunableAttention)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.make_prunable()

    def make_prunable(self) -> None:
        self.linear = reference.masked_linear
        self.live = None  # index tensor of the alive neurons; None: all
        self.fc1_mask = self.fc2_mask = None
        self.observer = None

    def use_kernel(self, masked_linear) -> None:
        self.linear = masked_linear

    def set_live(self, neurons: torch.Tensor, fc1_mask=None, fc2_mask=None) -> None:
        """neurons: bool [hidden], the alive neurons; masks: element masks of fc1 / fc2."""
        device = self.fc1.weight.device
        self.live = None if bool(neurons.all()) else neurons.nonzero().flatten().to(device)
        self.fc1_mask = None if fc1_mask is None else fc1_mask.to(device)
        self.fc2_mask = None if fc2_mask is None else fc2_mask.to(device)

    def live_neurons(self) -> torch.Tensor:
        return torch.arange(self.fc1.out_features, device=self.fc1.weight.device) if self.live is None else self.live

    def observe(self, observer) -> None:
        """Call observer(self, activations [B, N, neurons]) in every forward (None: stop)."""
        self.observer = observer

    def forward(self, x):
        x = self.linear(x, self.fc1.weight, self.fc1.bias, live_out=self.live, mask=self.fc1_mask)
        x = self.norm(self.drop1(self.act(x)))
        if self.observer is not None:
            self.observer(self, x)
        x = self.linear(x, self.fc2.weight, self.fc2.bias, live_in=self.live, mask=self.fc2_mask)
        return self.drop2(x)


def build_model(name: str, num_classes: int, img_size: int = 32, patch_size: int = 4,
                pretrained: Optional[str] = None) -> VisionTransformer:
    """timm.create_model(--model) for `img_size` inputs whose heads and neurons can be pruned;
    with `pretrained` (a timm name or a weights file) loaded by timm, ConfigError if it cannot."""
    import timm
    arch, overrides = ALIASES.get(name, (name, {}))
    kwargs = dict(overrides, num_classes=num_classes, img_size=img_size, patch_size=patch_size)
    if pretrained is None:
        return prunable(timm.create_model(arch, **kwargs))
    if is_weights_file(pretrained):
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained))
    else:
        kwargs["pretrained_cfg"] = pretrained_cfg(name, pretrained)
        from vitprune.hub import offline_unless_reachable
        offline_unless_reachable()
    try:
        model = timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # a missing cache entry, a file of another model, ...: timm says which
        raise ConfigError(f"--pretrained: timm cannot load {pretrained!r} into --model={name}: "
                          f"{_load_error(e)}") from None
    return prunable(model)


def prunable(model: VisionTransformer) -> VisionTransformer:
    """Make a plain timm VisionTransformer's heads and neurons prunable, in place: every block's
    Attention and Mlp become PrunableAttention and PrunableMlp, with every group alive (the
    forward is timm's). Its parameters stay the same objects. Any other model: ConfigError,
    the line --model gives. Returns the model."""
    blocks = getattr(model, "blocks", ())
    if isinstance(model, VisionTransformer) and all(type(b.attn) is PrunableAttention and type(b.mlp) is PrunableMlp
                                                    for b in blocks):
        return model  # already prunable
    reason = why_not_plain(model)
    if reason:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise ConfigError(f"prunable: {cannot_prune(name, reason)}")
    for block in blocks:
        block.attn.__class__, block.mlp.__class__ = PrunableAttention, PrunableMlp
        block.attn.make_prunable()
        block.mlp.make_prunable()
    return model


def fresh_weights(name: str, num_classes: int, img_size: int, patch_size: int, seed: int, state: int) -> dict:
    """A new timm init of --model (never pretrained) for state `state` of --rewind=random: drawn
    from a stream of its own, a hash of (seed, state), so it is no seed's θ0 (torch.manual_seed(seed))
    and the same on every process and after --resume. The global RNG is left as it was."""
    key = hashlib.sha256(f"vitprune --rewind=random seed {seed} state {state}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)  # 63 bits
        return build_model(name, num_classes, img_size, patch_size).state_dict()


def set_kernels(model: VisionTransformer, masked_linear) -> None:
    """Route every prunable linear of the model through `masked_linear` (a kernel backend)."""
    for block in model.blocks:
        block.attn.use_kernel(masked_linear)
        block.mlp.use_kernel(masked_linear)


def _load_error(e: Exception) -> str:
    """The line of a load error that says what is wrong (torch lists size mismatches below a header)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (useful or lines or [type(e).__name__])[0]
