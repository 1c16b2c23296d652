"""What a flag is: its metadata (help, group, valid values or range, kind, where it applies),
declared with `flag` beside each field of config.Config, and the value it had before it existed
(`BEFORE`), with which old run folders are read and resumed."""
import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """An interval of valid numbers, parsed once from its text: "[0, 1)", "(0, inf)"."""
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        lo, hi = text[1:-1].split(",")
        return cls(float(lo), float(hi), text[0] == "(", text[-1] == ")")

    def contains(self, x) -> bool:
        return (self.lo < x if self.lo_open else self.lo <= x) and (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def describe(self) -> str:
        """'[1, inf)' -> 'at least 1', '(0, inf)' -> 'greater than 0', '[0, 1)' -> 'in [0, 1)'."""
        if self.hi == math.inf:
            return f"{'greater than' if self.lo_open else 'at least'} {self.lo:g}"
        return f"in {self}"


# What a flag says: "what" to compute (the default); how to run ("execution": it may change
# on --resume and does not distinguish configurations); or how to run in a way that still
# changes the floating-point results ("numerics": a resumed run that changes it is not
# bit-identical).
KINDS = ("what", "execution", "numerics")


def flag(default, help: str, group: str, *, choices=None, range: str = None, kind: str = "what",
         requires: dict = None):
    """A Config field with what the command line, validation and reports need to know of it.

    choices: the valid values; range: interval of valid numbers, e.g. "[0, 1)" or "(0, inf)";
    kind: one of KINDS; requires: {field: values} under which the flag applies (e.g.
    {"method": ("rsst",)}): elsewhere it must keep its default, and reports do not show it."""
    assert kind in KINDS, kind
    meta = dict(help=help, group=group, choices=choices, range=Range.parse(range) if range else None, kind=kind,
                requires=requires or {})
    return dataclasses.field(default=default, metadata=meta)


# The value a flag had before it existed, for records written before it (their config.json lacks
# its key). Every flag added after the first records is listed, with the commit that added it
# (`git log -S 'NAME:' -- vitprune/config.py`); flags not listed are as old as the records. Mostly
# the value is the flag's default, but not always: RSST runs before --reg_formula used the seed's
# formula, and the synthetic set's split before --val_size held 500 of its 4,500 images. A flag
# added later falls back to its default: list it here when runs before it did something else.
BEFORE = {
    # 2c55702 (2026-11-28): a 10% split of CIFAR (5,000 images), 500 of the synthetic set's; 32 px, patch 4
    "val_size": lambda config: 500 if config.get("dataset") == "synthetic" else 0.1,
    "img_size": 32, "patch_size": 4,
    # f6cd0dc (2026-11-28): RSST's strength was the seed's coupled formula, g = --reg_granularity_prune
    "reg_formula": "seed", "reg_residual": 1e-3,
    # 5488fc8 (2026-11-29): the targets reached zero at the end of the state
    "reg_reach": 1.0,
    # e6f6ac2 (2026-11-29): every state trained --epochs
    "pruned_epochs": None,
    # d4fd305 (2026-11-29): the seed's augmentation, no teacher
    "aug": "crop_flip", "crop_scale_min": 0.08, "crop_ratio_max": 4 / 3, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
    "distill": "none", "distill_temp": 1.0, "distill_alpha": 0.5,
    # issue 27: states >= 1 followed --lr_schedule
    "retrain_lr": None,
}
