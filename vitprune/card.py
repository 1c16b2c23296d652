"""The model card of an export (DIR/README.md), generated from the run's records: the state
record the checkpoint carries (accuracy of the pruned network, parameters, FLOPs), its config,
its keep set and the preprocessing the network was trained with, under the YAML header the
Hugging Face Hub reads for the model page. vitprune.export without a card: what the model
itself tells (library_card)."""
from vitprune import fmt
from vitprune.hub import HF_HUB
from vitprune.structure import count, dims, widths
from vitprune.zoo import is_weights_file

# How to load each format the export holds, shown only for those it holds: from the export's
# folder, or from the Hub repository it was pushed to.
LOADING = {
    "model.pt2": """# model.pt2: torch alone
import torch
model = torch.export.load({pt2}).module()
logits = model(images)  # float32 [B, 3, {s}, {s}], normalised as above
""",
    "model.onnx": """# model.onnx: ONNX Runtime (pip install onnxruntime)
import onnxruntime
session = onnxruntime.InferenceSession({onnx})
logits = session.run(None, {{"images": images.numpy()}})[0]
""",
    "model.safetensors + config.json": """# model.safetensors + config.json: timm modules, through vitprune
import vitprune
model = vitprune.load_exported({folder})
"""}
# The Hub's names of the data sets torchvision's CIFAR loaders read.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
# Not timm's library_name: timm.create_model cannot build per-layer widths (load_exported can).
HUB_TAGS = ["vitprune", "pruning", "structured-pruning", "vision-transformer", "image-classification"]


def loading(formats: list, size: int, repo: str = None) -> str:
    """The card's Loading code for the formats written: from the folder, or from Hub `repo`."""
    where = (lambda f: f'hf_hub_download("{repo}", "{f}")') if repo else (lambda f: f'"./{f}"')
    blocks = [code.format(pt2=where("model.pt2"), onnx=where("model.onnx"), s=size,
                          folder=f'"{HF_HUB}{repo}"' if repo else '"."')
              for name, code in LOADING.items() if name in formats]
    fetched = repo and {"model.pt2", "model.onnx"} & set(formats)
    fetch = "from huggingface_hub import hf_hub_download\n\n" if fetched else ""
    return "```python\n" + fetch + "\n".join(blocks) + "```"


def hub_header(title: str = None, dataset: str = None, pretrained: str = None, accuracy: dict = None,
               method: str = None) -> str:
    """The card's YAML header, which the Hub reads for the model page: tags, the data set, the
    pruned network's accuracy per split (accuracy: {"validation": %, "test": %}), the timm
    weights it started from (base_model, their license) when --pretrained named a timm tag."""
    from huggingface_hub import EvalResult, ModelCardData
    hub_dataset = HUB_DATASETS.get(dataset)
    results = [EvalResult(task_type="image-classification", dataset_type=hub_dataset or dataset, dataset_name=dataset,
                          dataset_split=split, metric_type="accuracy", metric_name=f"{split} accuracy (%)",
                          metric_value=round(value, 2))
               for split, value in (accuracy or {}).items() if value is not None and dataset]
    base, license = base_model(pretrained)
    data = ModelCardData(library_name="vitprune", pipeline_tag="image-classification",
                         tags=HUB_TAGS + ([method] if method else []), datasets=[hub_dataset] if hub_dataset else None,
                         metrics=["accuracy"] if results else None, base_model=base, license=license,
                         model_name=title if results else None, eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n"


def base_model(pretrained: str):
    """(Hub id, license) of the timm weights --pretrained names; (None, None) for a file or none."""
    if not pretrained or is_weights_file(pretrained):
        return None, None
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(pretrained)
    except RuntimeError:  # a tag timm does not know
        return None, None
    return (cfg.hf_hub_id, cfg.license) if cfg is not None and cfg.hf_hub_id else (None, None)


def model_card(ck: dict, config: dict, model, structure, formats: list, repo: str = None) -> str:
    """DIR/README.md of an export: `config` is the export's config.json, `model` the masked
    network, `formats` what the export holds (deploy.save_deploy's names), `repo` the Hub
    repository it goes to, if any. It names no path of the machine it was made on: the source
    is config["source"]'s."""
    cfg, record, src, prep = ck["config"], ck.get("record", {}), config["source"], config["preprocessing"]
    counted = count(model, structure)
    title = f"{cfg['model']} pruned by {cfg['method']} — state {ck.get('state')}"
    header = hub_header(title, src.get("dataset"), cfg.get("pretrained"), method=cfg["method"],
                        accuracy={"validation": record.get("final_val_acc"), "test": record.get("final_test_acc")})
    lines = [header + f"# {title}", "",
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
             "", "## Loading", "", loading(formats, prep["img_size"], repo), ""]
    return "\n".join(lines)


def library_card(config: dict, model, structure, formats: list, repo: str = None) -> str:
    """DIR/README.md of vitprune.export given no card: the structure, parameters and FLOPs
    (the data, accuracy and preprocessing are its trainer's to state)."""
    counted = count(model, structure)
    lines = [hub_header() + f"# timm `{config['model']}` pruned with vitprune", "",
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
             "", "## Loading", "", loading(formats, config["img_size"], repo), ""]
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
