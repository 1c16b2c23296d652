"""The Hugging Face Hub, where timm's pretrained weights live: is it reachable, is a weight file
cached. No torch here: config validation asks before anything heavy loads, so a tag that cannot
be had offline fails in a moment instead of after huggingface_hub's retries."""
import functools
import os
import socket
import threading
from urllib.parse import urlparse


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
