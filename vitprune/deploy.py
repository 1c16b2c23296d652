"""The deploy formats: the physically compacted export of a pruned checkpoint (its benchmark:
bench/export.py).

export:        RUN/checkpoints/state_XX.pt -> DIR/model.safetensors + DIR/config.json (a timm
               VisionTransformer holding only the alive heads and neurons: timm.create_model of the
               run's architecture with every block's qkv/proj/fc1/fc2 cut to its alive widths; the
               residual width stays), DIR/model.pt2 (torch.export), DIR/model.onnx (ONNX Runtime) and
               DIR/README.md, the model card (card.py). Written as one set: into a folder beside DIR,
               then swapped in, so DIR never mixes two exports.
load_exported: DIR, or "hf-hub:ORG/NAME" (hub.py) -> that model, in eval mode.
compact, export_model: the same from a prunable model in memory (vitprune.compact, vitprune.export).
push=ORG/NAME: once written, what DIR holds goes to the Hub in one commit (hub.push_export).

Unstructured (imp) checkpoints have no dead groups: they export at dense shapes, with the pruned
weights stored as zeros.
"""
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from vitprune.config import dataset_name
from vitprune.errors import ConfigError
from vitprune.files import FULL_ERRNOS, DiskFull, fsync_dir, made_folders, temp_name, write_atomic, write_json
from vitprune.model import build_model
from vitprune.structure import Structure, apply_structure, dims, head_cols, head_rows
from vitprune.zoo import preprocessing

EXPORT_FORMAT = "vitprune-export/2"
# what an export folder holds (model.onnx.data: the ONNX weights of a model over 2 GB, beside model.onnx)
EXPORT_FILES = ("model.safetensors", "config.json", "model.pt2", "model.onnx", "model.onnx.data", "README.md")


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
    device = state["blocks.0.attn.qkv.weight"].device  # the structure's masks live on the CPU
    for l in range(L):
        heads = structure.heads[l].nonzero().flatten().to(device)
        neurons = _alive(structure.neurons[l]).to(device)
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


def export(checkpoint, out, push=None, private=False):
    """Export a state checkpoint as a compacted timm ViT, in three formats, with a model card:
    OUT/model.safetensors + OUT/config.json (vitprune.load_exported(OUT)), OUT/model.pt2
    (torch.export.load), OUT/model.onnx (ONNX Runtime; needs the [deploy] extra), OUT/README.md.

    checkpoint: RUN/checkpoints/state_XX.pt of any method; out: a new or empty folder, or an
    earlier export, which the new one replaces whole (written beside it, then swapped in).
    push: ORG/NAME, a Hugging Face Hub model repository: once OUT is written, what it holds is
    uploaded there in one commit (a login is needed: `hf auth login` or HF_TOKEN; without one,
    or without a network, nothing is written); private: a new repository is made private.
    """
    target = Path(os.path.realpath(out))  # a link to a folder: the export is swapped in where it points
    _check_out(target)
    _check_push(push, private, "--push")
    ck = load_checkpoint(checkpoint)
    model, structure = masked_model(ck)
    compact = compact_model(model, structure)
    config = {**architecture(model, structure), "params": n_params(compact),
              "preprocessing": checkpoint_preprocessing(ck), "keep_set_sha256": keep_set_hash(structure),
              "source": source(checkpoint, ck)}
    from vitprune.card import model_card
    formats = write_export(target, compact, config,
                           lambda formats: model_card(ck, config, model, structure, formats, push))
    if structure.elements is not None:
        print(f"note: {checkpoint} is unstructured ({ck['config'].get('method')}): no whole head or neuron is "
              f"pruned, so the export keeps the dense shapes with the pruned weights stored as zeros")
    print(f"exported {checkpoint} to {out} ({', '.join(formats)}, README.md): {config['params'] / 1e6:.3f}M of "
          f"{n_params(model) / 1e6:.3f}M parameters; heads per block {config['num_heads']}, MLP widths "
          f"{config['mlp_hidden']}")
    if push:
        _push(target, push, private, f"vitprune export of {config['source']['checkpoint']}", "--push")


def source(checkpoint, ck: dict) -> dict:
    """Where the export comes from, without a path of the machine it was made on: the
    checkpoint as RUN/checkpoints/state_XX.pt, a folder data set and a local weights file by
    their names."""
    path, cfg, record = Path(os.path.abspath(checkpoint)), ck["config"], ck.get("record", {})
    in_run = path.parent.name == "checkpoints"
    pretrained = cfg.get("pretrained")
    return {"checkpoint": "/".join(path.parts[-3:]) if in_run else path.name, "state": ck.get("state"),
            "method": cfg.get("method"), "model": cfg.get("model"), "dataset": _named(cfg.get("dataset")),
            "pretrained": os.path.basename(pretrained) if pretrained and os.path.isabs(pretrained) else pretrained,
            "ratio": cfg.get("ratio"), "params_alive": record.get("params_alive"),
            "final_val_acc": record.get("final_val_acc"), "final_test_acc": record.get("final_test_acc")}


def _named(dataset):
    """folder:PATH as folder:NAME (the folder's name); other data sets as they are."""
    return f"folder:{dataset_name(dataset)}" if dataset and dataset.startswith("folder:") else dataset


def write_export(target: Path, compact, config: dict, card) -> list:
    """The export's files, written as one set: into a folder beside `target`, then swapped in
    (an earlier export there is replaced whole). card(formats) -> README.md's Markdown. Returns
    the formats written."""
    with made_folders(target.parent):
        new = temp_name(target)
        try:
            new.mkdir()
            formats = _write_set(new, target, compact, config, card)
            _swap(new, target)
        finally:
            shutil.rmtree(new, ignore_errors=True)  # only there when the export failed
    return formats


def _write_set(folder: Path, target: Path, compact, config: dict, card) -> list:
    """Every file of the export, into `folder`; returns the formats written. A full disk is
    said naming the file in `target`, where the user will look for it."""
    try:
        write_atomic(folder / "model.safetensors", save(compact.state_dict(), metadata={"format": "pt"}))
        write_json(folder / "config.json", config)
        formats = ["model.safetensors + config.json", *save_deploy(compact, folder, config["img_size"])]
        write_atomic(folder / "README.md", card(formats))
    except DiskFull as e:
        raise DiskFull(target / e.path.name, e.needed) from None
    return formats


def _swap(new: Path, target: Path):
    """Put the folder `new` in place of `target`: the earlier export (if any) is renamed aside,
    the new one renamed in, then the earlier one deleted. A crash in between leaves the earlier
    export whole, as TARGET.PID.RANDOM.tmp beside it."""
    old = temp_name(target) if target.exists() else None
    if old:
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old:
        inside = _is_cwd(old)
        shutil.rmtree(old)
        if inside:  # --out . : this process and the shell it runs in stand in the deleted folder
            os.chdir(target)
            print(f"note: {target} is a new folder now: `cd {target}` again to see the export in a shell")


def _is_cwd(folder: Path) -> bool:
    try:
        return os.path.samefile(folder, os.getcwd())
    except OSError:
        return False


def export_model(model, out, card: str = None, push: str = None, private: bool = False) -> Path:
    """vitprune.export: the prunable `model` as it computes now (after structure.apply_structure)
    in the formats `export` writes, to folder `out`: README.md is `card` (Markdown), else a card
    of what the model tells (card.library_card). push="ORG/NAME": then upload the folder to that
    Hub repository in one commit, as `export --push` does (private: a new one is private).
    Returns `out`."""
    target = Path(os.path.realpath(out))
    _check_out(target)
    _check_push(push, private, "export: push")
    structure = Structure.live(model)
    compact = compact_model(model, structure).cpu()
    config = {**architecture(model, structure), "params": n_params(compact), "keep_set_sha256": keep_set_hash(structure)}
    from vitprune.card import library_card
    write_export(target, compact, config, lambda formats: card if card is not None else
                 library_card(config, model, structure, formats, push))
    if push:
        _push(target, push, private, "vitprune export", "export: push")
    return target


def _check_push(push, private: bool, label: str):
    """push/private before anything is read or written (hub.check_push: a name, a token, a network)."""
    if push is None:
        if private:
            raise ConfigError(f"{label.replace('push', 'private')}: applies only with a push to ORG/NAME")
        return
    from vitprune.hub import check_push
    check_push(push, label)


def _push(target: Path, repo: str, private: bool, message: str, label: str):
    from vitprune.hub import push_export
    url = push_export(target, repo, private, message, replaces=EXPORT_FILES, label=label)
    files = sorted(p.name for p in target.iterdir())
    print(f"pushed {target} to https://huggingface.co/{repo} in one commit ({', '.join(files)}): {url}")


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
    dynamic batch dimension; returns the names written. A full disk raises files.DiskFull."""
    program = torch_export(compact, img_size)
    pt2 = io.BytesIO()
    torch.export.save(program, pt2)
    write_atomic(out / "model.pt2", pt2.getvalue())
    try:
        save_onnx(program, out / "model.onnx", img_size)
    except ImportError:
        print("note: model.onnx not written: pip install 'vitprune[deploy]' (onnx, onnxscript, onnxruntime)")
        return ["model.pt2"]
    except OSError as e:  # the ONNX exporter writes the file itself
        if e.errno in FULL_ERRNOS:  # it needs at least the weights' bytes
            raise DiskFull(out / "model.onnx", sum(t.nbytes for t in compact.state_dict().values())) from None
        raise
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


def _check_out(out: Path):
    """--out is replaced whole, so it must be new, an empty folder, or an earlier export (a
    vitprune export's config.json and only export files): anything else is refused in one
    line, before anything is read or written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder: a new or empty one, or an earlier export")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or (set(entries) <= set(EXPORT_FILES) and _is_export(out)):
        return
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    raise ConfigError(f"--out: {out} holds {shown}, not only an earlier vitprune export, and an export replaces "
                      f"the folder whole; give a new or empty folder, or an earlier export")


def _is_export(folder: Path) -> bool:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("format", "")).startswith("vitprune-export/")
    except (OSError, ValueError, AttributeError):
        return False


def load_exported(path, device="cpu") -> VisionTransformer:
    """The model `export` wrote to folder `path`, or pushed to the Hub ("hf-hub:ORG/NAME",
    optionally @REVISION: fetched, or the Hub cache's copy offline), on `device`, in eval mode."""
    from vitprune.hub import HF_HUB, download_export
    if str(path).startswith(HF_HUB):
        path = download_export(str(path))
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
