"""The enqueue stage and the client library upstream services use to publish mail."""

from producer.client import Producer

__all__ = ["Producer"]
