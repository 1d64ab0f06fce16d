"""Tools for testing code that uses senderqueue, and for testing a backend.

* :class:`ManualClock` and :class:`ScaledClock`: clocks to inject into a queue.
* :class:`SpecModel`: a deliberately naive model of the specification.
* ``senderqueue.testing.conformance``: the conformance suite every backend passes
  (it needs pytest and hypothesis: ``pip install senderqueue[testing]``).
"""

from .._clock import ManualClock, ScaledClock
from .model import SpecModel

__all__ = ["ManualClock", "ScaledClock", "SpecModel"]
