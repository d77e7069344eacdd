"""Viewer IP -> location, from an operator-supplied table (no GeoIP database ships here).

The table is a CSV of ``cidr,latitude,longitude[,label]`` lines (``#`` comments allowed); the
longest matching prefix wins. Unknown addresses have no location: routing then ignores
geography for that viewer rather than guessing.
"""

from __future__ import annotations

import csv
import ipaddress
from pathlib import Path

from api_balancing.model import GeoPoint

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class GeoIpTable:
    """Longest-prefix match over a small table of networks."""

    def __init__(self, entries: list[tuple[str, GeoPoint]] | None = None) -> None:
        self._nets: list[tuple[_Net, GeoPoint]] = []
        for cidr, point in entries or []:
            self.add(cidr, point)

    def add(self, cidr: str, point: GeoPoint) -> None:
        if not (-90 <= point.latitude <= 90 and -180 <= point.longitude <= 180):
            raise ValueError(f"{cidr}: location {point} out of range")
        self._nets.append((ipaddress.ip_network(cidr, strict=False), point))
        self._nets.sort(key=lambda item: -item[0].prefixlen)

    def __len__(self) -> int:
        return len(self._nets)

    def lookup(self, ip: str) -> GeoPoint | None:
        if not ip:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for net, point in self._nets:
            if addr.version == net.version and addr in net:
                return point
        return None

    @classmethod
    def from_csv(cls, path: str | Path) -> GeoIpTable:
        """Load a table; a malformed line raises ValueError naming the file and line."""
        table = cls()
        with open(path, newline="", encoding="utf-8") as handle:
            for lineno, row in enumerate(csv.reader(handle), start=1):
                if not row or row[0].lstrip().startswith("#"):
                    continue
                try:
                    table.add(row[0].strip(), GeoPoint(float(row[1]), float(row[2])))
                except (IndexError, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: {exc}") from None
        return table
