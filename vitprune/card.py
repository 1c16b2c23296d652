"""The model card of an export (DIR/README.md), generated from the run's records: the state
record the checkpoint carries (accuracy of the pruned network, parameters, FLOPs), its config,
its keep set and the preprocessing the network was trained with. vitprune.export without a
card: what the model itself tells (library_card)."""
from vitprune import fmt
from vitprune.structure import count, dims, widths

# How to load each format the export holds, shown only for those it holds.
LOADING = {
    "model.pt2": """# model.pt2: torch alone
import torch
model = torch.export.load("{d}/model.pt2").module()
logits = model(images)  # float32 [B, 3, {s}, {s}], normalised as above
""",
    "model.onnx": """# model.onnx: ONNX Runtime (pip install onnxruntime)
import onnxruntime
session = onnxruntime.InferenceSession("{d}/model.onnx")
logits = session.run(None, {{"images": images.numpy()}})[0]
""",
    "model.safetensors + config.json": """# model.safetensors + config.json: timm modules, through vitprune
import vitprune
model = vitprune.load_exported("{d}")
"""}


def loading(formats: list, size: int) -> str:
    """The card's Loading code for the formats written."""
    blocks = [code.format(d=".", s=size) for name, code in LOADING.items() if name in formats]
    return "```python\n" + "\n".join(blocks) + "```"


def model_card(ck: dict, config: dict, model, structure, formats: list) -> str:
    """DIR/README.md of an export: `config` is the export's config.json, `model` the masked
    network, `formats` what the export holds (deploy.save_deploy's names). It names no path of
    the machine it was made on: the source is config["source"]'s."""
    cfg, record, src, prep = ck["config"], ck.get("record", {}), config["source"], config["preprocessing"]
    counted = count(model, structure)
    lines = [f"# {cfg['model']} pruned by {cfg['method']} — state {ck.get('state')}", "",
             f"Exported by vitprune from `{src['checkpoint']}`{_run_folder(src['checkpoint'])}, "
             f"state {ck.get('state')} of {cfg.get('states')}.", "",
             *fmt.table(("", "value"), [
                 ("method", f"{cfg['method']} (ratio {cfg.get('ratio')}, schedule {cfg.get('schedule')}, "
                            f"seed {cfg.get('seed')})"),
                 ("model", f"{cfg['model']} → timm `{config['model']}`, pretrained: {src.get('pretrained') or 'no'}"),
                 ("data", f"{src.get('dataset')}, {config['num_classes']} classes"),
                 ("val accuracy (pruned network)", _pct(record.get("final_val_acc"))),
                 ("test accuracy (pruned network)", _pct(record.get("final_test_acc"))),
                 ("parameters", f"{config['params']:,} (dense: {counted['params_total']:,})"),
                 ("FLOPs per image", f"{counted['flops_alive']:,} (dense: {counted['flops_total']:,})"),
                 ("removed", removed(structure, cfg.get("round_to", 1))),
                 ("keep set sha256", f"`{config['keep_set_sha256']}`")]),
             "", "## Preprocessing", "",
             f"RGB images resized to {prep['img_size']}×{prep['img_size']} ({prep['interpolation']}), scaled to "
             f"[0, 1], then normalised per channel: mean {prep['mean']}, std {prep['std']}.", "",
             "## Heads and neurons kept", "", *kept_table(config, model, structure),
             "", "## Loading", "", loading(formats, prep["img_size"]), ""]
    return "\n".join(lines)


def library_card(config: dict, model, structure, formats: list) -> str:
    """DIR/README.md of vitprune.export given no card: the structure, parameters and FLOPs
    (the data, accuracy and preprocessing are its trainer's to state)."""
    counted = count(model, structure)
    lines = [f"# timm `{config['model']}` pruned with vitprune", "",
             "Exported by `vitprune.export` from a model pruned in its own training loop; the data it learned, its "
             "accuracy and its preprocessing are not recorded here.", "",
             *fmt.table(("", "value"), [
                 ("parameters", f"{config['params']:,} (dense: {counted['params_total']:,})"),
                 ("FLOPs per image", f"{counted['flops_alive']:,} (dense: {counted['flops_total']:,})"),
                 ("removed", removed(structure)),
                 ("keep set sha256", f"`{config['keep_set_sha256']}`")]),
             "", "## Preprocessing", "", f"{config['img_size']}×{config['img_size']} RGB images, normalised as the "
             f"model was trained (not recorded here).",
             "", "## Heads and neurons kept", "", *kept_table(config, model, structure),
             "", "## Loading", "", loading(formats, config["img_size"]), ""]
    return "\n".join(lines)


def removed(structure, round_to: int = 1) -> str:
    """The share of each kind removed (the achieved ratios), and the rounding of the widths."""
    w = widths(structure)
    rounding = f"; MLP widths in multiples of {round_to} (--round_to)" if round_to > 1 else ""
    return f"{w['head_ratio_achieved']:.1%} of the heads, {w['mlp_ratio_achieved']:.1%} of the MLP neurons{rounding}"


def kept_table(config: dict, model, structure) -> list:
    """Per block: heads and MLP neurons kept, of the dense counts."""
    L, H, hd, D, M = dims(model)
    return fmt.table(("block", f"heads (of {H})", f"MLP neurons (of {M})"),
                     [(l, config["num_heads"][l], int(structure.neurons[l].sum())) for l in range(L)])


def _run_folder(checkpoint: str) -> str:
    parts = checkpoint.split("/")
    return f" (run folder `{parts[0]}`)" if len(parts) == 3 else ""


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.2f}%"
