"""Where a viewer plays and a publisher pushes, per protocol, on a given node."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote, urlsplit

from api_balancing.validation import INGEST_PROTOCOLS, VIEWER_PROTOCOLS

_PLAY = {
    "hls": "{base}/hls/{id}/index.m3u8",
    "llhls": "{base}/llhls/{id}/index.m3u8",
    "dash": "{base}/dash/{id}/index.mpd",
    "webrtc": "{base}/webrtc/{id}",
}


@lru_cache(maxsize=16384)
def playback_templates(
    base_url: str, capabilities: frozenset[str], protocol: str
) -> tuple[tuple[str, str, str], ...]:
    """(protocol, prefix, suffix) per playable protocol: routing builds URLs by concatenation."""
    wanted = (protocol,) if protocol else VIEWER_PROTOCOLS
    out = []
    for p in wanted:
        if p in capabilities and p in _PLAY:
            prefix, _, suffix = _PLAY[p].format(base=base_url, id="\0").partition("\0")
            out.append((p, prefix, suffix))
    return tuple(out)


@lru_cache(maxsize=65536)
def quoted(content_id: str) -> str:
    """The content id as it appears in a URL path."""
    return quote(content_id, safe="/:")


def playback_urls(base_url: str, content_id: str, capabilities: frozenset[str], protocol: str = ""
                  ) -> list[tuple[str, str]]:  # fmt: skip
    """(protocol, url) for the protocol asked for, or every viewer protocol the node offers."""
    cid = quoted(content_id)
    return [
        (p, prefix + cid + suffix)
        for p, prefix, suffix in playback_templates(base_url, capabilities, protocol)
    ]


def ingest_url(base_url: str, stream_key: str, protocol: str) -> str:
    """Where a publisher pushes ``stream_key`` with ``protocol`` (rtmp, srt or whip)."""
    host = urlsplit(base_url).hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    key = quote(stream_key, safe="")
    if protocol == "srt":
        return f"srt://{host}:8890?streamid=publish:{key}"
    if protocol == "whip":
        return f"{base_url}/whip/{key}"
    assert protocol in INGEST_PROTOCOLS
    return f"rtmp://{host}:1935/live/{key}"
