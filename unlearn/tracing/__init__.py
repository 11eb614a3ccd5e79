"""Where facts live: causal tracing and the layer choice it implies (``unlearn locate``)."""

from .command import locate
from .trace import choose_layers, facts_from, trace_facts

__all__ = ["choose_layers", "facts_from", "locate", "trace_facts"]
