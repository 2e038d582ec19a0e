"""The Nemotron-H model in pure torch, its checkpoint format, loading, tokenizer and sampling."""

from .caches import InferenceCache
from .modeling import Backbone, Block, NemotronHForCausalLM
from .moe import ExpertBackend, ExpertWork, MoEMixer, MoEObserver, ResidentExperts, RoutingEvent, StepListener

__all__ = [
    "Backbone",
    "Block",
    "ExpertBackend",
    "ExpertWork",
    "InferenceCache",
    "MoEMixer",
    "MoEObserver",
    "NemotronHForCausalLM",
    "ResidentExperts",
    "RoutingEvent",
    "StepListener",
]
