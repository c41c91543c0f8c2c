"""Kombu's Redis transport as the farm's workers read it: most urgent first, and hardened.

Two things Celery and kombu cannot be told through settings, each a small override of kombu's
Redis channel (kombu is pinned to the minor version these are written against, and
tests/test_celery_contract.py fails if an overridden method changes):

- Priority 9 is the most urgent (farm.wire), as in AMQP and everywhere else in the farm; kombu's
  Redis transport reads its priority lists lowest number first. The channel reads them highest
  first, one list per priority.
- Anyone who can write to Redis can push bytes into a queue list. Kombu raises on an entry that is
  not a JSON envelope, and Celery treats that as unrecoverable: the worker process exits. Here such
  an entry is logged and recorded in the rejected list, and the worker goes on.
"""

from __future__ import annotations

import logging
from queue import Empty

import redis
from kombu.transport import redis as kombu_redis

from smartdiff.farm.records import record_rejection
from smartdiff.farm.wire import transport_priority

log = logging.getLogger(__name__)


class UnreadableEntry(ValueError):
    """A queue entry that is JSON but not a kombu envelope."""


def check_envelope(message: object) -> None:
    # Checked before kombu reads it: kombu counts a KeyError as a lost connection, not a bad entry.
    if not isinstance(message, dict):
        raise UnreadableEntry(f"a JSON {type(message).__name__}, not an envelope object")
    properties = message.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        raise UnreadableEntry("no properties.delivery_tag")
    if not isinstance(properties.get("delivery_info", {}), dict) or not isinstance(
        message.get("headers", {}), dict
    ):
        raise UnreadableEntry("properties.delivery_info or headers is not an object")
    if "body" not in message:
        raise UnreadableEntry("no body")


class Channel(kombu_redis.Channel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # BRPOP takes the lists in the order of the steps: the most urgent first.
        self.priority_steps = sorted(self.priority_steps, reverse=True)

    def priority(self, n):
        # Every priority has its own list (farm.wire.PRIORITY_STEPS), so a priority is its own step
        # (kombu's version bisects steps it expects in ascending order).
        return transport_priority(n)

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (Empty, *self.connection_errors):
            raise
        except Exception as error:  # the popped entry was not a message kombu can read
            reason = f"unreadable queue entry dropped: {type(error).__name__}: {error}"
            log.error(reason)
            try:
                record_rejection(redis.Redis(connection_pool=self.pool), reason, None)
            except redis.RedisError:
                log.warning("could not record the rejection")
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        check_envelope(message)
        return super()._deliver(message, queue)
