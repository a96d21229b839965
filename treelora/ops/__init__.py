"""Public functional ops. Each op picks its backend per call (``cuda`` → ``triton`` → ``torch``; see
:mod:`treelora.backends`); the ``*_ref`` functions are the pure-PyTorch references the tests compare against."""

from treelora.ops.lora_linear import LoRALinearFunction, lora_linear, lora_linear_ref
from treelora.ops.masked_update import masked_adamw_, masked_adamw_ref_, masked_sgd_, masked_sgd_ref_
from treelora.ops.similarity import (
    IS_DISTANCE,
    METRICS,
    accumulate_and_compare_,
    pairwise_similarity,
    pairwise_similarity_ref,
)

__all__ = [
    "IS_DISTANCE",
    "METRICS",
    "LoRALinearFunction",
    "accumulate_and_compare_",
    "lora_linear",
    "lora_linear_ref",
    "masked_adamw_",
    "masked_adamw_ref_",
    "masked_sgd_",
    "masked_sgd_ref_",
    "pairwise_similarity",
    "pairwise_similarity_ref",
]
