"""Mamba-2 decode step: selective state update and causal conv update, each with its torch reference."""

from .reference import causal_conv1d_update_reference, selective_state_update_reference
from .step import causal_conv1d_update, selective_state_update

__all__ = [
    "causal_conv1d_update",
    "causal_conv1d_update_reference",
    "selective_state_update",
    "selective_state_update_reference",
]
