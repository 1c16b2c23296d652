"""The fingerprints that say whether two runs of one seed may be paired: of the images they
validate and test on (`split_fingerprint`), and of the State 0 they pruned (`weights_fingerprint`).

Two runs of one seed are paired by the report as if they shared their splits and State 0; these
hashes, recorded in summary.json and every state record, let it check instead of assuming. The
rewind point is not fingerprinted: the retraining strategies differ there by design.
"""
import hashlib
import json

import torch


def split_fingerprint(val_ids, test_ids) -> str:
    """Hex SHA-256 of which images a run validates and tests on, in their order: indices into the
    source's pool and test set (CIFAR, synthetic), or file paths relative to the image folder."""
    ids = {"val": [v if isinstance(v, str) else int(v) for v in val_ids],
           "test": [v if isinstance(v, str) else int(v) for v in test_ids]}
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def weights_fingerprint(state_dict: dict) -> str:
    """Hex SHA-256 of a model's weights: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
