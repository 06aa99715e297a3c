"""How many threads torch uses on CPU, given what else runs on the cores.

torch starts one thread per core. With other work on those cores its threads wait for each other
at every operation: on this project's 2-core machine, decoding SmolLM2 with 2 threads beside two
busy processes was several times slower than with 1 (README, "CPU threads"). So the CLI counts the
cores left free by the other processes (1-minute load average) and uses no more threads than that.
LOLCATS_THREADS=N chooses the count; OMP_NUM_THREADS / MKL_NUM_THREADS set by the user are kept.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "LOLCATS_THREADS"
_USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroups cpusets)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(current: int, cores: int, load: float, env: Mapping[str, str]) -> tuple[int, str | None]:
    """(threads, a one-line note or None) from torch's `current` count, the `cores` this process may
    use and the 1-minute `load` average taken before our own work starts."""
    if env.get(ENV_VAR):
        try:
            n = int(env[ENV_VAR])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV_VAR} must be a positive number of threads, got {env[ENV_VAR]!r}")
        return n, None
    if any(env.get(v) for v in _USER_VARS):
        return current, None
    free = max(1, min(cores, int(cores - load + 0.5)))  # (rounded: a load of 0.4 on 2 cores leaves 2)
    if free >= current:
        return current, None
    return free, (f"note: the load average is {load:.1f} on {cores} cores, so other work shares them; "
                  f"using {free} torch thread{'s' if free > 1 else ''} instead of {current} "
                  f"(set {ENV_VAR}=N to choose)")


def set_cpu_threads() -> str | None:
    """Apply `choose_threads` to torch; returns the note to show, if any."""
    import torch

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: keep torch's default
        load = 0.0
    threads, note = choose_threads(torch.get_num_threads(), available_cores(), load, os.environ)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return note
