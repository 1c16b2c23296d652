"""The Hugging Face Hub: where timm's pretrained weights live (is it reachable, is a weight file
cached) and where exports are shared (`push_export`, `download_export`). No torch here: config
validation asks before anything heavy loads, so a tag that cannot be had offline fails in a
moment instead of after huggingface_hub's retries (`check_pretrained`), and `export --push`
without a token or a network fails before anything is written (`check_push`)."""
import functools
import os
import socket
import threading
from pathlib import Path
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


HF_HUB = "hf-hub:"  # load_exported("hf-hub:ORG/NAME[@REVISION]"), as timm names Hub weights


def _failures() -> tuple:
    """What an unreachable or refusing Hub raises: OSError (huggingface_hub's HTTP errors,
    connection errors, offline mode) and, in huggingface_hub >= 1, its HTTP client's errors."""
    from huggingface_hub import errors
    return (OSError, getattr(errors, "HTTPError", OSError))


def _why(e: Exception) -> str:
    """An exception as a few words on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def check_repo(repo, label: str) -> None:
    """A Hub model repository named ORG/NAME, or ConfigError in one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise ConfigError(f"{label}: give a Hub repository as ORG/NAME (e.g. my-lab/vit-small-refill), "
                          f"not {repo!r}")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConfigError(f"{label}: {repo!r} is not a Hub repository id: ORG/NAME of letters, digits, '-', '_' "
                          f"and '.', neither starting nor ending with '-' or '.'") from None


def check_push(repo, label: str = "--push") -> None:
    """Before an export is written: the repository's name, a token, and a Hub that answers.
    Each missing one ends in one line, and nothing has been written or uploaded."""
    from huggingface_hub import get_token
    check_repo(repo, label)
    if not get_token():
        raise ConfigError(f"{label}: no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) and run "
                          f"the command again; nothing was written or uploaded")
    if not hub_reachable():
        raise ConfigError(f"{label}: the Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE is set); "
                          f"nothing was written or uploaded")


def push_export(folder: Path, repo: str, private: bool, message: str, replaces=(), label: str = "--push") -> str:
    """Upload what the export folder holds to the model repository `repo` (created if new,
    private if asked) in ONE commit: every file of `folder`, and the deletion of the files
    named in `replaces` (an earlier export's) that it no longer holds; other files of the
    repository stay. The files are uploaded first and committed after, so a failure part-way
    makes no commit. Returns the commit's URL; a failure ends in one line (ConfigError)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    api = HfApi()
    names = sorted(p.name for p in folder.iterdir())
    try:
        api.create_repo(repo, private=private or None, exist_ok=True)
        if private and not api.repo_info(repo).private:  # exist_ok leaves an existing repository as it is
            raise ConfigError(f"{label.replace('push', 'private')}: {repo} exists and is public; make it private "
                              f"on the Hub, or push to another repository; nothing was uploaded (the export in "
                              f"{folder} is whole)")
        stale = sorted(set(api.list_repo_files(repo)) & set(replaces) - set(names))
        additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
        api.preupload_lfs_files(repo, additions=additions)
        info = api.create_commit(repo, operations=[*additions, *map(CommitOperationDelete, stale)],
                                 commit_message=message)
    except _failures() as e:
        raise ConfigError(f"{label}: uploading to {repo} failed ({_why(e)}); no commit was made: the export in "
                          f"{folder} is whole, run the command again to push it") from None
    return info.commit_url


def download_export(spec: str) -> Path:
    """The folder of the export `spec` ("hf-hub:ORG/NAME[@REVISION]") names, in the Hub cache:
    fetched if the Hub answers, else the cached copy (HF_HUB_OFFLINE, no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo, _, revision = spec[len(HF_HUB):].partition("@")
    check_repo(repo, "load_exported")
    online = hub_reachable()
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=not online,
                                      allow_patterns=["config.json", "model.safetensors"]))
    except LocalEntryNotFoundError:
        raise ConfigError(f"load_exported: {spec} is not in the Hugging Face cache and the Hub cannot be reached; "
                          f"load it once online (or set HF_HOME to a cache holding it)") from None
    except _failures() as e:
        raise ConfigError(f"load_exported: cannot fetch {spec} from the Hub ({_why(e)})") from None
