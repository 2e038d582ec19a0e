"""The Nemotron-H model in pure torch, its checkpoint format, loading, tokenizer and sampling."""

from .caches import InferenceCache
from .modeling import Backbone, Block, NemotronHForCausalLM
from .moe import MoEMixer, MoEObserver, ResidentExperts, RoutingEvent

__all__ = [
    "Backbone",
    "Block",
    "InferenceCache",
    "MoEMixer",
    "MoEObserver",
    "NemotronHForCausalLM",
    "ResidentExperts",
    "RoutingEvent",
]
