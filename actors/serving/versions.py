"""Traffic shares of served policy versions and the picker that follows them (no Ray, no server).

A share is a fraction in [0, 1]. Versions without an explicit share split what the explicit ones
leave; so `--traffic B=0.1` with versions A and B gives A 0.9, and a rollback (B=0) gives A all of
it without naming A. The picker is a smooth weighted round-robin (nginx's): deterministic, so over
any window of requests each version's count is within one of its share (no sampling noise to
explain away in a canary's numbers), and a version at share 0 is never picked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""A version name: what clients send as `model`, also part of its Serve application's name."""

TOLERANCE = 1e-9


def resolve_shares(versions: list[str], explicit: Mapping[str, float]) -> dict[str, float]:
    """Every version's share: the explicit ones, the rest split evenly over the others.

    ValueError (naming the version) for an unknown name, a share outside [0, 1], explicit shares
    above 1 in total, all shares explicit but not summing to 1, or no traffic at all."""
    for name, share in explicit.items():
        if name not in versions:
            raise ValueError(f"traffic names {name!r}, which is not a served version ({', '.join(versions) or 'none'})")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"traffic share of {name!r} must be in [0, 1], got {share}")
    given = sum(explicit.values())
    rest = [v for v in versions if v not in explicit]
    if given > 1.0 + TOLERANCE:
        raise ValueError(f"traffic shares sum to {given:g}, more than 1")
    if not rest and abs(given - 1.0) > TOLERANCE:
        raise ValueError(f"traffic shares sum to {given:g}; they must sum to 1 when every version has one "
                         "(or leave one version without a share to take the rest)")
    shares = {v: float(explicit[v]) if v in explicit else (1.0 - given) / len(rest) for v in versions}
    if not any(s > TOLERANCE for s in shares.values()):
        raise ValueError("no version gets any traffic")
    return shares


class WeightedRoundRobin:
    """Smooth weighted round-robin over the versions with a share above 0."""

    def __init__(self, shares: Mapping[str, float]) -> None:
        self.shares = {v: s for v, s in shares.items() if s > TOLERANCE}
        if not self.shares:
            raise ValueError("no version gets any traffic")
        self.total = sum(self.shares.values())
        self.current = dict.fromkeys(self.shares, 0.0)

    def pick(self) -> str:
        for version, share in self.shares.items():
            self.current[version] += share
        chosen = max(self.current, key=self.current.__getitem__)  # ties: the first in order
        self.current[chosen] -= self.total
        return chosen
