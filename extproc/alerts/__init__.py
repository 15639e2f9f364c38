"""Budget alerts: webhooks told when a counter crosses a `warn_at` threshold, is exhausted, starts
downgrading, is forecast to run out, or spikes (docs/alerts.md).

policy.py (the `alerts:` section), events.py (pure evaluation and payloads), store.py (Redis keys:
claims, hourly history), delivery.py (webhooks, retries, the delivery log), monitor.py (the
background task that ties them together).
"""

from .policy import EVENTS, Alert, AlertList, EventKind, SpikeSpec, alert_problems

__all__ = ["EVENTS", "Alert", "AlertList", "EventKind", "SpikeSpec", "alert_problems"]
