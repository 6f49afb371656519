"""Reading compiled HLO text: the bytes each device sends in collectives, and their replica groups.

`replica_groups` is the one parser of the three ways XLA prints a collective's replica groups (iota
`[groups,size]<=[dims]T(perm)`, explicit `{{0,1},{2,3}}`, and `mesh['a'=4,'b'=2] {'b'}` with optional
`device_ids=`); `_group_info_block`, `_group_info` and `_group_size` derive a group's size, whether it
is a block of consecutive device ids, and the smallest aligned block holding it, from those groups.
`collective_bytes` sums, over the collectives of the optimised HLO, the bytes each device sends.
"""
from __future__ import annotations

import math
import re

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _shape_bytes(shape: str) -> int:
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(d) for d in m["dims"].split(",") if d]
        total += math.prod(dims) * _BYTES[m["dtype"]]
    return total


def _block(groups, num_devices: int) -> int:
    """The smallest aligned block of device ids (a divisor of the device count) holding each group."""
    for b in range(1, num_devices + 1):
        if num_devices % b == 0 and all(min(g) // b == max(g) // b for g in groups):
            return b
    return num_devices



def _ints(text: str | None) -> list[int]:
    return [int(x) for x in (text or "").split(",") if x]


def _iota(size: int, dims: str | None, perm: str | None):
    """Device ids 0..size-1 laid out as `dims` (default flat), then transposed by `perm` (if any)."""
    import numpy as np

    ids = np.arange(size)
    if dims:
        ids = ids.reshape(_ints(dims))
        if perm:
            ids = ids.transpose(_ints(perm))
    return ids


def replica_groups(line: str) -> list[list[int]] | None:
    """The replica groups of a collective's HLO line as lists of device ids, or None if not printed.

    Formats: iota `replica_groups=[G,S]<=[dims]T(perm)` (ids 0..G·S-1 laid out as dims, transposed,
    read as G groups of S); explicit `replica_groups={{0,1},{2,3}}`; mesh
    `replica_groups=mesh['a'=4,'b'=2][, device_ids=([dims]T(perm))] {'b'}` (the mesh's devices, the
    groups along the named axes).
    """
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]*)\](?:T\(([0-9,]*)\))?", line)
    if m:
        groups, size = int(m[1]), int(m[2])
        return _iota(groups * size, m[3], m[4]).reshape(groups, size).tolist()
    m = re.search(r"replica_groups=\{(\{[0-9,{}]*\})\}", line)
    if m:
        return [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m[1])]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]*)\](?:T\(([0-9,]*)\))?\))?"
                  r"\s*\{([^}]*)\}", line)
    if m:
        axes = [(k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])]
        shape = [v for _, v in axes]
        ids = _iota(math.prod(shape), m[2], m[3]).reshape(shape)
        named = set(re.findall(r"'([^']+)'", m[4]))
        group = [i for i, (k, _) in enumerate(axes) if k in named]
        rest = [i for i in range(len(axes)) if i not in group]
        size = math.prod(shape[i] for i in group)
        return ids.transpose(rest + group).reshape(-1, size).tolist()
    return None


def _group_info_block(line: str, num_devices: int) -> tuple[int, bool, int]:
    """(group size, consecutive aligned ids, smallest aligned id block holding each group).

    Without printed groups: one group of all `num_devices`."""
    groups = replica_groups(line)
    if not groups or not groups[0]:
        return num_devices, True, num_devices
    size = len(groups[0])
    b = _block(groups, max(num_devices, max(max(g) for g in groups) + 1))
    return size, b == size, b


def _group_info(line: str, num_devices: int) -> tuple[int, bool]:
    """(devices per replica group, whether each group is a block of consecutive aligned device ids)."""
    return _group_info_block(line, num_devices)[:2]


def _group_size(line: str, num_devices: int) -> int:
    return _group_info_block(line, num_devices)[0]


def collective_bytes(hlo_text: str, num_devices: int, *, by_group: bool = False) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind (ring algorithms), from optimised HLO.

    all-gather with result R over g devices: R·(g-1)/g; reduce-scatter with result R: R·(g-1);
    all-reduce of R: 2·R·(g-1)/g; all-to-all: R·(g-1)/g; collective-permute: R.
    `by_group=True` keys the bytes by "<group size>:<contiguous|strided>:<block>" instead, block
    being the smallest aligned range of device ids holding each group (consecutive devices share a
    node on GPU clusters).
    """
    out: dict[str, float] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        op, size = m["op"], _shape_bytes(m["shape"])
        g, contiguous, block = _group_info_block(line, num_devices)
        g = max(1, g)
        if g == 1 and op != "collective-permute":
            continue
        factor = {"all-gather": (g - 1) / g, "reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / g,
                  "all-to-all": (g - 1) / g, "collective-permute": 1.0}[op]
        if m["start"] and op in ("all-gather", "collective-permute"):  # async: (operands, results[, ...])
            arrays = [x.group(0) for x in _ARRAY.finditer(m["shape"])]
            size = sum(_shape_bytes(x) for x in arrays[len(arrays) // 2 : 2 * (len(arrays) // 2)]) or size
        key = f"{g}:{'contiguous' if contiguous else 'strided'}:{block}" if by_group else op
        out[key] = out.get(key, 0.0) + size * factor
    return out
