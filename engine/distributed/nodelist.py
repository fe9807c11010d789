"""Slurm hostlist expressions: ``node[01-04,07]``, ``a-[1-2],b3``, ``rack[1-2]-gpu[1-2]``.

Slurm compresses node lists (``SLURM_JOB_NODELIST``); the rendezvous host is the first one. Ranges keep
their zero padding (``[08-10]`` gives ``08, 09, 10``), and several bracket groups in one name expand as a
product, left to right, as ``scontrol show hostnames`` does.
"""

from __future__ import annotations

import itertools


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '[' in host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("unclosed '['")
    parts.append(text[start:])
    return parts


def _expand_range(body: str) -> list[str]:
    """``01-03,7`` -> ``01, 02, 03, 7``."""
    out: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r}")
        width = len(lo)
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_name(name: str) -> list[str]:
    pieces: list[list[str]] = []  # alternating literal text and bracket choices
    rest = name
    while "[" in rest:
        head, _, tail = rest.partition("[")
        body, _, rest = tail.partition("]")
        pieces += [[head], _expand_range(body)]
    pieces.append([rest])
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a Slurm host list, in order; ValueError if it is malformed or empty."""
    hosts = [h for part in _split_top_level(nodelist.strip()) if part for h in _expand_name(part)]
    if not hosts:
        raise ValueError("empty host list")
    return hosts
