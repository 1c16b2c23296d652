"""timm Vision Transformers for --img_size images in --patch_size patches (the default
32x32 in patches of 4: 64 patches + class token; 224/16 takes timm's pretrained ViTs as they are).

The models are plain timm `VisionTransformer`s; only the attention and MLP classes are
swapped for subclasses whose forward skips dead heads and neurons. Parameter names and
shapes are timm's, so state dicts load into timm and back.
"""
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer

from vitprune.config import ConfigError
from vitprune.kernels import reference
from vitprune.structure import head_cols, head_rows

# name -> (embed_dim, depth, num_heads, mlp_ratio)
MODEL_SPECS = {
    "vit_micro": (64, 4, 4, 2.0),    # CPU demos and tests
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),  # the seed's model: 21.3M parameters
    "vit_base": (768, 12, 12, 4.0),
}


class PrunableAttention(Attention):
    """timm Attention that computes only the alive heads.

    `set_live` chooses the heads: the forward then computes q, k, v for the alive heads only
    (their rows of `qkv`), attention over those heads, and `proj` through the columns that
    read them. Element masks (unstructured pruning) multiply `qkv` and `proj`. The linears
    run through `self.linear`, a masked_linear of the kernel backend (`use_kernel`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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


def build_model(name: str, num_classes: int, img_size: int = 32, patch_size: int = 4) -> VisionTransformer:
    """A timm VisionTransformer for `img_size` inputs whose heads and neurons can be pruned."""
    dim, depth, heads, mlp_ratio = MODEL_SPECS[name]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                             embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                             qkv_bias=True, attn_layer=PrunableAttention, mlp_layer=PrunableMlp)


def set_kernels(model: VisionTransformer, masked_linear) -> None:
    """Route every prunable linear of the model through `masked_linear` (a kernel backend)."""
    for block in model.blocks:
        block.attn.use_kernel(masked_linear)
        block.mlp.use_kernel(masked_linear)


# --- pretrained transfer (--pretrained) ------------------------------------------------------


def load_pretrained(model: VisionTransformer, spec: str) -> str:
    """Load pretrained ViT weights into `model` (built by build_model); return a summary line.

    spec: a timm model name (e.g. vit_small_patch16_224.augreg_in21k_ft_in1k; timm fetches
    the weights through huggingface_hub or its cache) or a local .safetensors / .pth / .pt /
    .bin file holding a timm-format state dict, plain or under "state_dict" / "model".
    Blocks, norms and the class token are copied; the patch embedding is resampled to the
    model's patch size and the position embedding to its grid (+ the class token); the
    classifier stays the model's own, newly initialised one. Anything that does not fit
    raises ConfigError with one line naming --pretrained.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    source, source_heads = _pretrained_state_dict(spec)
    _check_architecture(model, source, source_heads, spec)
    state, transferred, resampled, new = {}, 0, [], []
    for key, own in model.state_dict().items():
        if key.startswith("head."):  # the classifier: new classes, new weights
            state[key] = own
            new.append(key)
            continue
        value = source[key].to(own.dtype)
        if key == "patch_embed.proj.weight" and value.shape != own.shape:
            state[key] = resample_patch_embed(value, list(own.shape[-2:]))
            resampled.append(f"patch {value.shape[-2]}×{value.shape[-1]} → {own.shape[-2]}×{own.shape[-1]}")
        elif key == "pos_embed" and value.shape != own.shape:
            old = _pos_grid(value.shape[1] - model.num_prefix_tokens, spec)
            state[key] = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), old_size=[old, old],
                                                num_prefix_tokens=model.num_prefix_tokens)
            resampled.append(f"position grid {old}×{old} → {'×'.join(map(str, model.patch_embed.grid_size))}")
        elif value.shape != own.shape:
            raise ConfigError(f"--pretrained: {key} is {_shape(value)} in {spec} but {_shape(own)} in "
                              f"{_model_flag(model)}")
        else:
            state[key] = value
            transferred += 1
    model.load_state_dict(state)
    return (f"--pretrained {spec}: {transferred} tensors transferred, {len(resampled)} resampled "
            f"({', '.join(resampled) or 'none'}), {len(new)} newly initialised ({', '.join(new)})")


def _pretrained_state_dict(spec: str):
    """(state dict, heads per block or None): a local file's tensors, or a timm model's
    pretrained weights. A file cannot say how many heads split its qkv; timm's model can."""
    import os

    if os.path.isfile(spec):
        return _read_weights(spec), None
    import timm
    from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        source = timm.create_model(spec, pretrained=True)
    except LocalEntryNotFoundError:
        raise ConfigError(f"--pretrained: the weights of timm model {spec!r} are not in the Hugging Face "
                          f"cache and the Hub cannot be reached; download them once online or pass a local "
                          f".safetensors/.pth file") from None
    except Exception as e:  # unknown tag, no pretrained weights, ...: timm says which
        raise ConfigError(f"--pretrained: timm cannot load pretrained {spec!r}: {_first_line(e)}") from None
    if not isinstance(source, VisionTransformer):
        raise ConfigError(f"--pretrained: timm model {spec!r} is a {type(source).__name__}, not a "
                          f"VisionTransformer")
    return source.state_dict(), source.blocks[0].attn.num_heads


def _read_weights(path: str) -> dict:
    """The tensors of a weights file, unwrapped from a training checkpoint if need be."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path)
        else:  # weights_only: a downloaded pickle must not run code
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "safetensors" if path.endswith(".safetensors") else "torch.save"
        raise ConfigError(f"--pretrained: cannot read {path!r} as a {kind} file ({type(e).__name__}: "
                          f"{_first_line(e)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--pretrained: {path!r} holds no state dict of tensors (plain, or under "
                          f"'state_dict' / 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DistributedDataParallel saves


def _check_architecture(model: VisionTransformer, source: dict, source_heads, spec: str) -> None:
    """Raise ConfigError unless `source` holds the same ViT as `model` (up to the patch size,
    the position grid and the classifier): the first difference found, in one line."""
    flag = _model_flag(model)
    if not {"patch_embed.proj.weight", "pos_embed", "cls_token"} <= source.keys():
        raise ConfigError(f"--pretrained: {spec} is not a timm ViT with a class token (no patch_embed.proj.weight, "
                          f"pos_embed or cls_token; keys start {', '.join(list(source)[:3])})")
    dim = source["patch_embed.proj.weight"].shape[0]
    if dim != model.embed_dim:
        raise ConfigError(f"--pretrained: embed dim {dim} of {spec} does not match {flag} ({model.embed_dim})")
    depth = 1 + max((int(k.split(".")[1]) for k in source if k.startswith("blocks.")), default=-1)
    if depth != len(model.blocks):
        raise ConfigError(f"--pretrained: depth {depth} of {spec} does not match {flag} ({len(model.blocks)})")
    heads = model.blocks[0].attn.num_heads
    if source_heads is not None and source_heads != heads:
        raise ConfigError(f"--pretrained: {source_heads} heads per block in {spec} do not match {flag} ({heads})")
    own = {k for k in model.state_dict() if not k.startswith("head.")}
    theirs = {k for k in source if not k.startswith("head.")}
    for keys, what in ((sorted(theirs - own), f"has tensors {flag} lacks"),
                       (sorted(own - theirs), f"lacks tensors of {flag}")):
        if keys:
            raise ConfigError(f"--pretrained: {spec} {what}: {', '.join(keys[:4])}"
                              f"{f' (+{len(keys) - 4} more)' if len(keys) > 4 else ''}")
    patch, own_patch = source["patch_embed.proj.weight"], model.patch_embed.proj.weight
    if patch.ndim != 4 or patch.shape[1] != own_patch.shape[1]:
        raise ConfigError(f"--pretrained: patch_embed.proj.weight is {_shape(patch)} in {spec}; {flag} takes "
                          f"{own_patch.shape[1]} input channels")


def _pos_grid(tokens: int, spec: str) -> int:
    """Side of the square grid of `tokens` position embeddings."""
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ConfigError(f"--pretrained: the position embedding of {spec} has {tokens} patch tokens after the "
                          f"class token, not a square grid")
    return side


def _model_flag(model: VisionTransformer) -> str:
    """'--model=NAME' for error messages: the MODEL_SPECS entry `model` was built from."""
    shape = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads,
             model.blocks[0].mlp.fc1.out_features / model.embed_dim)
    return next((f"--model={name}" for name, spec in MODEL_SPECS.items() if spec == shape), "the model")


def _shape(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
