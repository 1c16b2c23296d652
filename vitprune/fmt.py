"""How numbers read to a person: durations, counts, sizes and Markdown tables, one home for
the console, the report and the benchmarks. Pure Python (the report imports it without torch)."""


def clock(seconds: float) -> str:
    """A duration as a clock reads: 1m05s, 2h03m (console ETA and run time)."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def duration(s: float) -> str:
    """A duration in the unit that keeps it short: 42.0 s, 3.5 min, 1.2 h."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def count(x) -> str:
    """A count with a decimal suffix: 6.55M, 12.3K."""
    for unit, scale, digits in (("G", 1e9, 2), ("M", 1e6, 2), ("K", 1e3, 1)):
        if x >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return str(x)


def flops(x) -> str:
    """A FLOP count with an SI prefix and three significant digits: 1.23 PFLOP, n/a for None."""
    if x is None:
        return "n/a"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def size(n: float) -> str:
    """Bytes, in the largest binary unit that keeps the number at least 1."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def mib(n) -> str:
    """Bytes as a bare MiB number for a table column already labelled MiB."""
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def ratio(num, den) -> str:
    """num / den as 1.23×, or n/a when either is missing."""
    return "n/a" if num is None or den is None or den == 0 else f"{num / den:.2f}×"


def table(header, rows) -> list:
    """A Markdown table as a list of lines."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]
