"""Which scenes each process embeds: shards of a job array, ranks of a distributed run.

Two levels, both deterministic:

- **Shards** (``--shard K/N``, one per task of a Slurm job array or a Kubernetes indexed job):
  scene ``i`` of the input list belongs to shard ``i mod N``. It depends on the list alone (its
  order and length), never on the machine, the time or what is already done, so every task of
  an array agrees on the split without talking to the others, and the shards are disjoint and
  together cover the list.
- **Ranks** (``--gpus N`` on one node, ``torchrun`` on many): with at least as many scenes as
  ranks, each rank takes whole scenes, balanced by pixel count (:func:`balance`: largest first,
  each to the least-loaded rank); with fewer, every rank computes a band of rows of each scene
  in turn (one big scene over many GPUs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from deo_cli.errors import UsageError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; ``None`` stays ``None``."""
    if text is None or text == "":
        return None
    if isinstance(text, tuple):
        k, n = text
    else:
        m = _SHARD.match(str(text))
        if not m:
            raise UsageError(
                f"--shard {text} is not K/N",
                "give the task's index and the number of tasks, e.g. --shard $SLURM_ARRAY_TASK_ID/8",
            )
        k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {k}/{n} is out of range", f"K must be 0..{max(n - 1, 0)} for N = {n}")
    return k, n


def shard_of(n_items: int, shard: tuple[int, int] | None) -> list[int]:
    """Indices of the items of ``shard`` (all when ``None``): every N-th, starting at K."""
    if shard is None:
        return list(range(n_items))
    k, n = shard
    return list(range(k, n_items, n))


def balance(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of ``weights`` split into ``parts`` lists of about equal total weight: largest
    first, each to the part with the least so far (ties: the lower index). Each list is in
    input order. Deterministic: every rank computes the same split from the same weights."""
    loads = [0.0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        p = min(range(parts), key=lambda j: (loads[j], j))
        out[p].append(i)
        loads[p] += float(weights[i])
    return [sorted(o) for o in out]


def scene_mode(n_scenes: int, world: int) -> bool:
    """Whether ranks take whole scenes (at least one scene per rank) rather than row bands."""
    return world > 1 and n_scenes >= world


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
