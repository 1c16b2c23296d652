"""Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
import os


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
