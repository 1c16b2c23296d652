"""Which timm models vitprune prunes, and what their pretrained weights expect.

--model is any timm name whose class is a plain `VisionTransformer` (ViT, DeiT, augreg, DINO,
DINOv2, CLIP-style ViTs; with or without a pretrained tag) or one of the short ALIASES.
Preprocessing (mean, std, interpolation) comes from the weights' timm `pretrained_cfg`. torch
and timm load only inside the functions, so config.py reads the names here before they load.
"""
import functools
import os
from typing import Optional

# short name -> (timm name, its overrides); built at --img_size/--patch_size like any timm name
ALIASES = {
    "vit_small": ("vit_small_patch16_224", {}),  # the seed's model: 21.3M parameters
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_micro": ("vit_tiny_patch16_224", dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)),  # CPU tests
}
FAMILIES = ("plain timm VisionTransformers: ViT (augreg, orig_in21k), DeiT (not distilled), DINO, DINOv2, "
            "CLIP/SigLIP-style ViTs")
# From scratch: the normalisation of timm's augreg ViTs.
PREPROCESSING = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors")  # --pretrained: a file, not a timm name


def timm_name(name: str) -> str:
    """The timm name --model stands for (an alias's, or the name itself)."""
    return ALIASES[name][0] if name in ALIASES else name


def why_not_plain(model) -> Optional[str]:
    """Why vitprune cannot prune this timm model (None: it can): every block must be timm's
    plain pre-norm Block with its Attention and Mlp and no norm across heads or neurons."""
    import torch
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    if type(model) is not VisionTransformer:
        extra = " and a distillation token" if "Distilled" in type(model).__name__ else ""
        return f"it is a {type(model).__name__}{extra}, not a plain VisionTransformer"
    for block in model.blocks:
        if type(block) is not Block:
            return f"its blocks are {type(block).__name__}, not timm's plain Block"
        if getattr(block.attn, "gate", None) is not None:
            return "its attention is gated"
        if type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            return f"its blocks use {type(block.attn).__name__}/{type(block.mlp).__name__}, not Attention/Mlp"
        if not isinstance(block.attn.norm, torch.nn.Identity) or not isinstance(block.mlp.norm, torch.nn.Identity):
            return "it normalises across heads or neurons inside attention/MLP (scale_attn_norm/scale_mlp_norm)"
    return None


@functools.lru_cache
def check_model(name: str) -> int:
    """Raise ValueError (one line) unless --model names a plain timm ViT; return its patch size.
    Built on the meta device: nothing is allocated or downloaded."""
    import timm
    import torch
    arch, overrides = ALIASES.get(name, (name, {}))
    if not timm.is_model(arch.split(".", 1)[0]):
        raise ValueError(f"--model: {name!r} is neither a timm model name nor one of {', '.join(ALIASES)}; "
                          f"vitprune prunes {FAMILIES}")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **overrides)
    except Exception as e:
        raise ValueError(f"--model: timm cannot build {name!r}: {_first_line(e)}") from None
    reason = why_not_plain(model)
    if reason:
        raise ValueError(f"--model: {cannot_prune(name, reason)}")
    return model.patch_embed.patch_size[0]


def cannot_prune(name: str, reason: str) -> str:
    """The refusal of a model that is not a plain timm ViT (why_not_plain's reason), for --model
    and vitprune.prunable alike."""
    return f"{name} cannot be pruned: {reason}; vitprune prunes {FAMILIES}"


def is_weights_file(spec: str) -> bool:
    """--pretrained names a file (a path, or a weights file's extension), else a timm name."""
    return os.sep in spec or spec.endswith(WEIGHT_FILES)


def pretrained_cfg(name: str, pretrained: Optional[str]) -> Optional[dict]:
    """timm's pretrained_cfg of the weights --pretrained names: a timm name's (tag or default
    tag), or for a local file the one of --model's timm name. None from scratch."""
    if pretrained is None:
        return None
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(timm_name(name) if is_weights_file(pretrained) else pretrained)
    return cfg.to_dict() if cfg is not None else {}


def preprocessing(name: str, pretrained: Optional[str] = None) -> dict:
    """mean, std (per channel, of images in [0, 1]) and interpolation the run feeds the model:
    the pretrained weights' own, else PREPROCESSING."""
    cfg = pretrained_cfg(name, pretrained) or {}
    return {k: list(cfg[k]) if isinstance(cfg.get(k), tuple) else cfg.get(k) or v for k, v in PREPROCESSING.items()}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
