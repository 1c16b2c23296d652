"""The Hugging Face Hub, where timm's pretrained weights live: is it reachable, is a weight file
cached. No torch here: config validation asks before anything heavy loads, so a tag that cannot
be had offline fails in a moment instead of after huggingface_hub's retries (`check_pretrained`)."""
import functools
import os
import socket
import threading
from urllib.parse import urlparse

from vitprune.errors import ConfigError
from vitprune.zoo import is_weights_file


@functools.lru_cache  # one probe per process
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub answers a TCP connection within `timeout` s (DNS included: a thread);
    False in huggingface_hub's offline mode."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    answered = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def offline_unless_reachable() -> None:
    """Without a network, put huggingface_hub in offline mode: the cache answers at once
    instead of after its retries."""
    if not hub_reachable():
        from huggingface_hub import constants
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def cache_holds_models() -> bool:
    """Whether the Hub cache holds any model repository (before timm is imported to say which)."""
    from huggingface_hub import constants
    try:
        return any(name.startswith("models--") for name in os.listdir(constants.HF_HUB_CACHE))
    except OSError:
        return False


def cached(cfg: dict) -> bool:
    """Whether the Hub cache holds the weights of this timm pretrained_cfg."""
    from huggingface_hub import try_to_load_from_cache
    repo = cfg.get("hf_hub_id")
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def check_pretrained(spec: str):
    """--pretrained: a path must be a readable file; anything else a timm name with pretrained weights that are
    in the Hugging Face cache or can be fetched (no network: fail now, not after retries)."""
    if is_weights_file(spec):
        if not os.path.isfile(spec) or not os.access(spec, os.R_OK):
            raise ConfigError(f"--pretrained: cannot read file {spec!r}; give a readable .safetensors/.pth/"
                              f".pt/.bin file or a timm model name")
        return
    offline = not hub_reachable()
    if offline and not cache_holds_models():  # said before timm loads: a few seconds at most
        raise ConfigError(f"--pretrained: {spec!r} is not a file, and timm weights cannot be had: the Hugging Face "
                          f"cache is empty and the Hub cannot be reached; download the weights once online (or "
                          f"set HF_HOME to a cache holding them) or pass a local .safetensors/.pth file")
    import timm
    from timm.models import get_pretrained_cfg
    if not timm.is_model(spec.split(".", 1)[0]):
        raise ConfigError(f"--pretrained: {spec!r} is neither a file nor a timm model name "
                          f"(e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)")
    try:
        cfg = get_pretrained_cfg(spec)
    except RuntimeError as e:  # an unknown tag
        raise ConfigError(f"--pretrained: {e}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"--pretrained: timm has no pretrained weights for {spec!r}")
    if offline and not cached(cfg.to_dict()):
        raise ConfigError(f"--pretrained: the weights of {spec!r} are not in the Hugging Face cache and the Hub "
                          f"cannot be reached; download them once online (or set HF_HOME to a cache holding "
                          f"them) or pass a local .safetensors/.pth file")
