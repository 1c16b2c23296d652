"""Where a run executes: the device, the precision of its matmuls, and torchrun's processes."""
import contextlib
import os

import torch
import torch.distributed as dist

from vitprune.config import Config
from vitprune.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} requested but CUDA is not available; choose from auto, cpu")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast in bf16 (--precision; 'auto': on CUDA). On CUDA the fp32 matmuls
    and convolutions use TF32 either way."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(bf16: bool, device: torch.device):
    """The context every forward runs in: bf16 autocast, or nothing (fp32)."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def init_distributed(cfg: Config):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on
    CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU. (config checked the batch splits.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device
