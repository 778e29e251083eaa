"""Round-robin timing shared by the host-time diagnostics (decode_step_host.py, prefill_host.py):
every configuration once per round, ``warmup`` rounds discarded (../shared/MEASURING.md)."""
import statistics
from collections.abc import Callable


def round_robin(configs: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """{name: the values of ``rounds`` rounds} of each configuration's timing function."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(warmup + rounds):
        for name, fn in configs.items():
            value = fn()
            if r >= warmup:
                times[name].append(value)
    return times


def summarize(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per configuration: min, median and spread ((max - min) / min) in us, and for every other than
    ``base`` its extra over ``base`` (of the mins and of the medians)."""
    rows = {}
    for name, values in times.items():
        low, mid = min(values), statistics.median(values)
        rows[name] = {"min_us": low, "median_us": mid, "spread": (max(values) - low) / low}
    for name, row in rows.items():
        if name != base:
            row.update(extra_min_us=row["min_us"] - rows[base]["min_us"],
                       extra_median_us=row["median_us"] - rows[base]["median_us"])
    return rows
