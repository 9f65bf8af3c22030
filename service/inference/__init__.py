"""Inference in the API process: a memory-bounded model cache and dynamic batching.

`Inference` (inference.py) ties them together for one predict call; the model cache
lives in cache.py, the batcher in batcher.py, the thread rules in threads.py.
"""

from service.inference.batcher import Batcher
from service.inference.cache import ModelCache, ModelRef
from service.inference.inference import (
    CPU_FORWARD_PIXELS,
    Inference,
    InferenceDep,
    batched_forward,
    check_inference_settings,
    forward_rows,
    get_inference,
    install,
)
from service.inference.timing import PredictTiming

__all__ = [
    "CPU_FORWARD_PIXELS",
    "Batcher",
    "Inference",
    "InferenceDep",
    "ModelCache",
    "ModelRef",
    "PredictTiming",
    "batched_forward",
    "check_inference_settings",
    "forward_rows",
    "get_inference",
    "install",
]
