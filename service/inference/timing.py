"""Where a predict's time went, for its `Server-Timing` header.

Clients and operators read the header (browsers' developer tools show it too) to tell a
slow model from a queue or a slow upload; benchmarks/service_speed.py reads it to split
the service's own overhead from the forward, request by request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PredictTiming:
    """Seconds a predict spent in each stage, summed over its chunks of images."""

    decode_s: float = 0.0  # decoding and resizing its images, on the decode threads
    wait_s: float = 0.0  # from its rows being ready to their forward starting
    forward_s: float = 0.0  # the forwards its rows were in (shared with a batch's others)

    def header(self, total_s: float) -> str:
        """The `Server-Timing` value: stage durations in milliseconds, `total` last."""
        stages = {
            "decode": self.decode_s,
            "wait": self.wait_s,
            "forward": self.forward_s,
            "total": total_s,
        }
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in stages.items())
