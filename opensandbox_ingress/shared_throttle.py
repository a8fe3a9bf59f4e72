"""
C{--renew-intent-shared-throttle}: one renew intent per sandbox per
interval across every replica and worker, with the throttle kept in Redis.

Each process keeps its local throttle (it spares Redis the repeats); on top
of it, before pushing a batch, the publishing thread claims each sandbox's
slot for the interval with one atomic C{SET key 1 NX PX interval} per
sandbox, all in one pipeline (one round trip), and pushes only the intents
whose claim succeeded.  The first process to claim a sandbox in an interval
publishes; the others count the intent as throttled.  If the push then
fails, the claims it made are released (best effort), so a later attempt
can publish.

The key is C{<queue key>:throttle:<sandbox id>}; it expires by itself.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from .config import RenewIntentConfig
from .renew import RenewIntentPublisher


def throttle_key(config: RenewIntentConfig, sandbox_id: str) -> str:
    """The Redis key that holds C{sandbox_id}'s slot for the interval."""
    return f"{config.queue_key}:throttle:{sandbox_id}"


class SharedThrottlePublisher(RenewIntentPublisher):
    """
    A L{RenewIntentPublisher} whose per-sandbox throttle is shared through
    Redis (see the module docstring).

    @ivar shared_throttled: intents this process did not push because
        another process (or an earlier batch) held the sandbox's slot;
        written by the publishing thread only.
    """

    def __init__(self, reactor: Any, config: RenewIntentConfig, **kwargs: Any) -> None:
        super().__init__(reactor, config, **kwargs)
        self._interval_ms = int(config.min_interval_s * 1000)
        self.shared_throttled = 0

    def _send(self, client: redis.Redis, payloads: list[bytes]) -> None:
        if self._interval_ms <= 0:
            super()._send(client, payloads)
            return
        config = self._config
        keys = [throttle_key(config, json.loads(p)["sandbox_id"]) for p in payloads]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, b"1", nx=True, px=self._interval_ms)
        claimed = pipe.execute()
        admitted = [p for p, ok in zip(payloads, claimed) if ok]
        mine = [k for k, ok in zip(keys, claimed) if ok]
        self.shared_throttled += len(payloads) - len(admitted)
        if not admitted:
            return
        try:
            super()._send(client, admitted)
        except Exception:
            # The intents were not pushed: give the slots back so a retry
            # (this one's, or another process's) can publish them.
            try:
                client.delete(*mine)
            except Exception:
                pass
            self.shared_throttled -= len(payloads) - len(admitted)
            raise
