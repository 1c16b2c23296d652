"""Physically compacted export of a pruned checkpoint (its benchmark: `bench.bench_export`).

export:        RUN/checkpoints/state_XX.pt -> DIR/model.safetensors + DIR/config.json: a plain timm
               VisionTransformer that holds only the alive heads and neurons. Widths differ per
               block, so every block's attn / mlp is replaced by a smaller timm Attention (alive
               heads, same head_dim) / Mlp (alive neurons); the residual width stays.
load_exported: DIR -> that model, in eval mode.

Unstructured (imp) checkpoints have no dead groups: they export at dense shapes, with the pruned
weights stored as zeros.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer

from vitprune.config import ConfigError
from vitprune.log import write_atomic, write_json
from vitprune.model import build_model
from vitprune.structure import Structure, apply_structure, dims, head_cols, head_rows

EXPORT_FORMAT = "vitprune-export/1"


def load_checkpoint(path) -> dict:
    """An end-of-state checkpoint (RUN/checkpoints/state_XX.pt), or ConfigError in one line."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint: cannot read {str(path)!r} ({type(e).__name__}); "
                          f"give a run's checkpoints/state_XX.pt") from None
    if not isinstance(ck, dict) or not {"model", "structure", "config"} <= ck.keys():
        raise ConfigError(f"checkpoint: {str(path)!r} has no model + structure + config (rewind.pt holds "
                          f"weights only); give a run's checkpoints/state_XX.pt")
    return ck


def masked_model(ck: dict):
    """(model, structure): the checkpoint's network as training evaluated it (dense shapes,
    dead groups zero and skipped), on the CPU in eval mode."""
    weights = ck["model"]
    cfg = ck["config"]  # the run's input size too (a run at --img_size=16 has 17 positions)
    model = build_model(cfg["model"], num_classes=weights["head.weight"].shape[0], img_size=cfg.get("img_size", 32),
                        patch_size=cfg.get("patch_size", 4))
    model.load_state_dict(weights)
    structure = Structure.from_state_dict(ck["structure"])
    apply_structure(model, structure)
    return model.eval(), structure


def _alive(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the alive groups of one block. With none alive, keep group 0 (zero after
    apply_structure, so it adds exactly nothing): timm's Mlp reads hidden_features=0 as
    'as wide as the input'."""
    alive = mask.nonzero().flatten()
    return alive if len(alive) else torch.zeros(1, dtype=torch.long)


def architecture(model, structure: Structure) -> dict:
    """What rebuilds the compacted model (the architecture part of config.json)."""
    L, H, hd, D, M = dims(model)
    return {
        "format": EXPORT_FORMAT,
        "img_size": model.patch_embed.img_size[0], "patch_size": model.patch_embed.patch_size[0],
        "in_chans": model.patch_embed.proj.in_channels, "embed_dim": D, "depth": L, "head_dim": hd,
        "num_classes": model.num_classes,
        # block l: timm Attention(num_heads[l], attn_head_dim=head_dim), timm Mlp(mlp_hidden[l])
        "num_heads": [int(structure.heads[l].sum()) for l in range(L)],
        "mlp_hidden": [len(_alive(structure.neurons[l])) for l in range(L)],
        "dense": {"num_heads": H, "mlp_hidden": M},
        "unstructured": structure.elements is not None,
    }


def compact_state_dict(model, structure: Structure) -> dict:
    """The model's weights with only the alive heads' qkv rows / proj columns and the alive
    neurons' fc1 rows / fc2 columns; every other tensor unchanged. `model` must be pruned
    to `structure` (apply_structure), so element-masked weights are already zero."""
    L, H, hd, D, M = dims(model)
    state = model.state_dict()
    for l in range(L):
        heads, neurons = structure.heads[l].nonzero().flatten(), _alive(structure.neurons[l])
        rows, cols = head_rows(heads, H, hd), head_cols(heads, hd)
        p = f"blocks.{l}."
        state.update({
            p + "attn.qkv.weight": state[p + "attn.qkv.weight"].index_select(0, rows),
            p + "attn.qkv.bias": state[p + "attn.qkv.bias"].index_select(0, rows),
            p + "attn.proj.weight": state[p + "attn.proj.weight"].index_select(1, cols),
            p + "mlp.fc1.weight": state[p + "mlp.fc1.weight"].index_select(0, neurons),
            p + "mlp.fc1.bias": state[p + "mlp.fc1.bias"].index_select(0, neurons),
            p + "mlp.fc2.weight": state[p + "mlp.fc2.weight"].index_select(1, neurons),
        })
    return state


def build_exported(arch: dict, device="meta") -> VisionTransformer:
    """The compacted timm VisionTransformer `arch` (config.json) describes. On the default
    device "meta" it allocates nothing: give it weights with
    load_state_dict(..., assign=True)."""
    D, hd = arch["embed_dim"], arch["head_dim"]
    with torch.device(device):
        model = VisionTransformer(img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"],
                                  num_classes=arch["num_classes"], embed_dim=D, depth=arch["depth"],
                                  num_heads=arch["dense"]["num_heads"], qkv_bias=True)
        for block, heads, hidden in zip(model.blocks, arch["num_heads"], arch["mlp_hidden"]):
            block.attn = Attention(D, num_heads=heads, attn_head_dim=hd, qkv_bias=True)
            block.mlp = Mlp(D, hidden_features=hidden)
    return model


def compact_model(model, structure: Structure) -> VisionTransformer:
    """The plain timm model computing what `model` pruned to `structure` computes."""
    compact = build_exported(architecture(model, structure))
    compact.load_state_dict(compact_state_dict(model, structure), assign=True)
    return compact.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def export(checkpoint, out):
    """Export a state checkpoint as a compacted timm ViT: OUT/model.safetensors + OUT/config.json.

    checkpoint: RUN/checkpoints/state_XX.pt of any method; out: folder (created). Load it back
    with vitprune.load_exported(OUT).
    """
    out = Path(out)
    _refuse_foreign_folder(out)
    ck = load_checkpoint(checkpoint)
    model, structure = masked_model(ck)
    compact = compact_model(model, structure)
    record, cfg = ck.get("record", {}), ck["config"]
    config = {**architecture(model, structure), "params": n_params(compact), "source": {
        "checkpoint": str(Path(checkpoint).resolve()), "state": ck.get("state"), "method": cfg.get("method"),
        "model": cfg.get("model"), "dataset": cfg.get("dataset"), "ratio": cfg.get("ratio"),
        "params_alive": record.get("params_alive"), "final_test_acc": record.get("final_test_acc")}}
    out.mkdir(parents=True, exist_ok=True)
    # through temp files (log.DiskFull on a full disk): an earlier export stays whole until replaced
    write_atomic(out / "model.safetensors", save(compact.state_dict(), metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    if structure.elements is not None:
        print(f"note: {checkpoint} is unstructured ({cfg.get('method')}): no whole head or neuron is pruned, "
              f"so the export keeps the dense shapes with the pruned weights stored as zeros")
    print(f"exported {checkpoint} to {out}: {config['params'] / 1e6:.3f}M of {n_params(model) / 1e6:.3f}M "
          f"parameters; heads per block {config['num_heads']}, MLP widths {config['mlp_hidden']}")


def _refuse_foreign_folder(out: Path):
    """Never overwrite a config.json that export did not write (a run folder's, say)."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        ours = json.loads(path.read_text()).get("format") == EXPORT_FORMAT
    except (ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"--out: {out} holds a config.json that is not a vitprune export (a run folder?); "
                          f"choose another folder")


def load_exported(path, device="cpu") -> VisionTransformer:
    """The model `export` wrote to folder `path`, on `device`, in eval mode."""
    path = Path(path)
    try:
        arch = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"load_exported: no readable config.json in {path} ({type(e).__name__})") from None
    if arch.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"load_exported: {path / 'config.json'} is not a {EXPORT_FORMAT} config")
    model = build_exported(arch)
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)), assign=True)
    return model.eval()
