"""--model: any timm name of a plain VisionTransformer, built by timm.create_model; the forward
with every group alive is stock timm's on the same weights; other architectures are refused."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitprune.model import PrunableAttention, PrunableMlp, build_model
from vitprune.structure import Structure, apply_structure

from conftest import run_cli
from test_folder import write_tree

# --model -> (timm name, its arguments in stock timm, patch size for 32-px inputs)
MODELS = {
    "deit_small_patch16_224": ("deit_small_patch16_224", {}, 16),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": ("vit_small_patch16_224", {}, 16),
    "vit_micro": ("vit_tiny_patch16_224", dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0), 8),
}


def stock(name, num_classes=10):
    arch, args, patch = MODELS[name]
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=32, patch_size=patch, **args)


@pytest.mark.parametrize("name", MODELS)
def test_forward_equals_stock_timm_with_every_group_alive(name):
    torch.manual_seed(0)
    model = build_model(name, 10, img_size=32, patch_size=MODELS[name][2]).eval()
    assert type(model) is VisionTransformer
    assert model.pretrained_cfg["architecture"] == MODELS[name][0]  # built by timm.create_model
    assert all(type(b.attn) is PrunableAttention and type(b.mlp) is PrunableMlp for b in model.blocks)
    reference = stock(name).eval()
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
    assert shapes(model) == shapes(reference)
    reference.load_state_dict(model.state_dict())
    apply_structure(model, Structure.full(model))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,why", [
    ("deit_small_distilled_patch16_224", "VisionTransformerDistilled and a distillation token"),
    ("swin_tiny_patch4_window7_224", "it is a SwinTransformer, not a plain VisionTransformer"),
    ("eva02_tiny_patch14_224", "it is a Eva, not a plain VisionTransformer"),
    ("vit_small_patch16_18x2_224", "its blocks are ParallelThingsBlock"),
    ("resnet_no_such", "is neither a timm model name nor one of vit_small, vit_tiny, vit_base, vit_micro"),
])
def test_other_architectures_are_refused_in_one_line(monkeypatch, tmp_path, capsys, name, why):
    code = run_cli(monkeypatch, "run", f"--model={name}", "--dataset=synthetic", f"--out_dir={tmp_path}",
                   "--wandb=disabled")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --model: ") and why in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_prune_one_state_on_a_folder_set(name, monkeypatch, tmp_path):
    """2 states × 1 epoch on a few dozen PNGs: state 1 is pruned, and stock timm holding the
    checkpoint's weights computes what the pruned network computes (dead groups are zero)."""
    root = write_tree(tmp_path / "images", {"": 10})
    assert run_cli(monkeypatch, "run", f"--dataset=folder:{root}", f"--model={name}", "--img_size=32",
                   f"--patch_size={MODELS[name][2]}", "--val_size=6", "--method=refill", "--ratio=0.5",
                   "--states=2", "--epochs=1", "--batch_size=8", "--optimizer=adamw", "--lr=1e-3",
                   f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path}", "--name=r", "--wandb=disabled") == 0
    ck = torch.load(tmp_path / "r" / "checkpoints" / "state_01.pt", weights_only=True)
    structure = Structure.from_state_dict(ck["structure"])
    assert not structure.heads.all() and not structure.neurons.all()
    assert ck["record"]["params_alive"] < ck["record"]["params_total"]
    model = build_model(name, 3, img_size=32, patch_size=MODELS[name][2])
    model.load_state_dict(ck["model"])
    apply_structure(model, structure)
    reference = stock(name, 3)
    reference.load_state_dict(ck["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - reference.eval()(x)).abs().max() <= 1e-4


def test_weight_decay_skips_what_the_model_names():
    """make_optimizer asks the model (timm's no_weight_decay) which tensors take no decay."""
    from vitprune.config import Config
    from vitprune.step import make_optimizer

    model = build_model("vit_micro", 10)

    def undecayed():
        _, no_decay = make_optimizer(Config(optimizer="adamw", epochs=1), model, 1, torch.device("cpu"))[0].param_groups
        ids = {id(p) for p in no_decay["params"]}
        return {name for name, p in model.named_parameters() if id(p) in ids and p.ndim >= 2}
    assert undecayed() == {"pos_embed", "cls_token"}
    model.no_weight_decay = lambda: {"pos_embed", "blocks.0.attn.qkv.weight"}
    assert undecayed() == {"pos_embed", "blocks.0.attn.qkv.weight"}
