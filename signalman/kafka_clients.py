"""Starting aiokafka clients so that a start that does not complete leaves nothing open.

An aiokafka consumer or producer opens connections (and a consumer with topics already joins its
group) inside ``start()``. If ``start()`` fails or is cancelled half-way (a broker down, a replica
stopping meanwhile), the half-started client must still be stopped: otherwise its connections and
background tasks stay open (aiokafka warns "Unclosed AIOKafkaConsumer") until garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class KafkaClient(Protocol):
    """What ``start_client`` needs of an aiokafka consumer or producer."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_client(client: KafkaClient, stop_timeout_s: float = 5.0) -> None:
    """Start ``client``; if the start fails or is cancelled, stop it, then re-raise.

    The stop is bounded by ``stop_timeout_s`` and shielded (a second cancellation leaves it
    running to its end in the background); a stop that fails is not reported over the start's
    own error, which is what the caller gets.
    """
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(client.stop()), stop_timeout_s)
        raise
