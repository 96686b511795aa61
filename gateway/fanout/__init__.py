"""Fan-out: from one stamped event to every local subscriber whose filter matches."""

from gateway.fanout.router import Router, Subscriber

__all__ = ["Router", "Subscriber"]
