"""The deploy formats: the physically compacted export of a pruned checkpoint (its benchmark:
bench/export.py).

export:        RUN/checkpoints/state_XX.pt -> DIR/model.safetensors + DIR/config.json (a timm
               VisionTransformer holding only the alive heads and neurons: timm.create_model of the
               run's architecture with every block's qkv/proj/fc1/fc2 cut to its alive widths; the
               residual width stays), DIR/model.pt2 (torch.export), DIR/model.onnx (ONNX Runtime) and
               DIR/README.md, the model card (card.py).
load_exported: DIR -> that model, in eval mode.
compact, export_model: the same from a prunable model in memory (vitprune.compact, vitprune.export).

Unstructured (imp) checkpoints have no dead groups: they export at dense shapes, with the pruned
weights stored as zeros.
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from vitprune.errors import ConfigError
from vitprune.files import write_atomic, write_json
from vitprune.model import build_model
from vitprune.structure import Structure, apply_structure, dims, head_cols, head_rows
from vitprune.zoo import preprocessing

EXPORT_FORMAT = "vitprune-export/2"


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
    weights, cfg = ck["model"], ck["config"]
    model = build_model(cfg["model"], weights["head.weight"].shape[0], cfg.get("img_size", 32), cfg.get("patch_size", 4))
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


def model_args(model) -> dict:
    """The timm.create_model overrides that rebuild the dense shapes (vit_micro's are not its
    timm name's)."""
    L, H, hd, D, M = dims(model)
    return {"embed_dim": D, "depth": L, "num_heads": H, "mlp_ratio": M / D}


def architecture(model, structure: Structure) -> dict:
    """What rebuilds the compacted model (the architecture part of config.json)."""
    L, H, hd, D, M = dims(model)
    return {
        "format": EXPORT_FORMAT, "model": model.pretrained_cfg["architecture"], "model_args": model_args(model),
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
    """The compacted timm VisionTransformer `arch` (config.json) describes: timm.create_model
    of the dense architecture with every block's linears cut to its alive heads and neurons.
    On the default device "meta" it allocates nothing: give it weights with
    load_state_dict(..., assign=True)."""
    import timm
    D, hd = arch["embed_dim"], arch["head_dim"]
    with torch.device(device):
        model = timm.create_model(arch["model"], pretrained=False, num_classes=arch["num_classes"],
                                  img_size=arch["img_size"], patch_size=arch["patch_size"], **arch["model_args"])
        for block, heads, hidden in zip(model.blocks, arch["num_heads"], arch["mlp_hidden"]):
            a, m = block.attn, block.mlp
            a.num_heads, a.attn_dim = heads, heads * hd
            a.qkv = torch.nn.Linear(D, 3 * heads * hd, bias=a.qkv.bias is not None)
            a.proj = torch.nn.Linear(heads * hd, D, bias=a.proj.bias is not None)
            m.fc1 = torch.nn.Linear(D, hidden, bias=m.fc1.bias is not None)
            m.fc2 = torch.nn.Linear(hidden, D, bias=m.fc2.bias is not None)
    return model


def compact_model(model, structure: Structure) -> VisionTransformer:
    """The plain timm model computing what `model` pruned to `structure` computes, in eval
    mode, with tensors of its own (training it leaves `model` as it is)."""
    compact = build_exported(architecture(model, structure))
    compact.load_state_dict({k: v.clone() for k, v in compact_state_dict(model, structure).items()}, assign=True)
    return compact.eval()


def compact(model) -> VisionTransformer:
    """vitprune.compact: the plain, physically smaller timm model computing what the prunable
    `model` computes now (after structure.apply_structure, its dead groups zero), on its device."""
    return compact_model(model, Structure.live(model))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def export(checkpoint, out):
    """Export a state checkpoint as a compacted timm ViT, in three formats, with a model card:
    OUT/model.safetensors + OUT/config.json (vitprune.load_exported(OUT)), OUT/model.pt2
    (torch.export.load), OUT/model.onnx (ONNX Runtime; needs the [deploy] extra), OUT/README.md.

    checkpoint: RUN/checkpoints/state_XX.pt of any method; out: folder (created).
    """
    out = Path(out)
    _refuse_foreign_folder(out)
    ck = load_checkpoint(checkpoint)
    model, structure = masked_model(ck)
    compact = compact_model(model, structure)
    record, cfg = ck.get("record", {}), ck["config"]
    config = {**architecture(model, structure), "params": n_params(compact),
              "preprocessing": checkpoint_preprocessing(ck), "keep_set_sha256": keep_set_hash(structure),
              "source": {"checkpoint": str(Path(checkpoint).resolve()), "state": ck.get("state"),
                         "method": cfg.get("method"), "model": cfg.get("model"), "dataset": cfg.get("dataset"),
                         "ratio": cfg.get("ratio"), "params_alive": record.get("params_alive"),
                         "final_val_acc": record.get("final_val_acc"), "final_test_acc": record.get("final_test_acc")}}
    from vitprune.card import model_card
    formats = write_export(out, compact, config, model_card(ck, config, model, structure))
    if structure.elements is not None:
        print(f"note: {checkpoint} is unstructured ({cfg.get('method')}): no whole head or neuron is pruned, "
              f"so the export keeps the dense shapes with the pruned weights stored as zeros")
    print(f"exported {checkpoint} to {out} ({', '.join(formats)}, README.md): {config['params'] / 1e6:.3f}M of "
          f"{n_params(model) / 1e6:.3f}M parameters; heads per block {config['num_heads']}, MLP widths "
          f"{config['mlp_hidden']}")


def export_model(model, out, card: str = None) -> Path:
    """vitprune.export: the prunable `model` as it computes now (after structure.apply_structure)
    in the formats `export` writes, to folder `out`: README.md is `card` (Markdown), else a card
    of what the model tells (card.library_card). Returns `out`."""
    out = Path(out)
    _refuse_foreign_folder(out)
    structure = Structure.live(model)
    compact = compact_model(model, structure).cpu()
    config = {**architecture(model, structure), "params": n_params(compact), "keep_set_sha256": keep_set_hash(structure)}
    if card is None:
        from vitprune.card import library_card
        card = library_card(config, model, structure)
    write_export(out, compact, config, card)
    return out


def write_export(out: Path, compact, config: dict, card: str) -> list:
    """OUT/model.safetensors + OUT/config.json, the deploy formats and OUT/README.md (`card`);
    returns the formats written."""
    out.mkdir(parents=True, exist_ok=True)
    # through temp files (files.DiskFull on a full disk): an earlier export stays whole until replaced
    write_atomic(out / "model.safetensors", save(compact.state_dict(), metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    formats = ["model.safetensors + config.json", *save_deploy(compact, out, config["img_size"])]
    write_atomic(out / "README.md", card)
    return formats


def checkpoint_preprocessing(ck: dict) -> dict:
    """What the checkpoint's network was fed (img_size, mean, std, interpolation); checkpoints
    from before it was saved: derived from their config, as the run derived it."""
    if ck.get("preprocessing"):
        return ck["preprocessing"]
    cfg = ck["config"]
    return {"img_size": cfg.get("img_size", 32), **preprocessing(cfg["model"], cfg.get("pretrained"))}


def keep_set_hash(structure: Structure) -> str:
    """sha256 of the keep set (alive heads, neurons, and element masks if any): equal hashes,
    equal tickets."""
    h = hashlib.sha256(structure.heads.numpy().tobytes() + structure.neurons.numpy().tobytes())
    for name in sorted(structure.elements or {}):
        h.update(name.encode() + structure.elements[name].numpy().tobytes())
    return h.hexdigest()


def save_deploy(compact, out: Path, img_size: int) -> list:
    """OUT/model.pt2 (torch.export) and OUT/model.onnx (when onnx is installed), both with a
    dynamic batch dimension; returns the names written."""
    program = torch_export(compact, img_size)
    torch.export.save(program, out / "model.pt2")
    try:
        save_onnx(program, out / "model.onnx", img_size)
    except ImportError:
        print("note: model.onnx not written: pip install 'vitprune[deploy]' (onnx, onnxscript, onnxruntime)")
        return ["model.pt2"]
    return ["model.pt2", "model.onnx"]


BATCH = {0: torch.export.Dim("batch", min=1, max=65536)}  # the dynamic dimension of both deploy formats


def torch_export(compact, img_size: int):
    """The ExportedProgram of the compacted model, any batch size."""
    return torch.export.export(compact, (torch.randn(2, 3, img_size, img_size),), dynamic_shapes=(BATCH,))


def save_onnx(program, path: Path, img_size: int) -> None:
    """An ONNX file of an ExportedProgram: input "images", output "logits". ImportError without
    onnx/onnxscript (torch.onnx's exporter needs both)."""
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401
    onnx_program = torch.onnx.export(program, (torch.randn(2, 3, img_size, img_size),), dynamic_shapes=(BATCH,),
                                     input_names=["images"], output_names=["logits"], dynamo=True, verbose=False)
    onnx_program.save(str(path))


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
