"""fs-engine: a fairness-aware LLM serving engine with cheap preemption (FastSwitch design)."""

from fs_engine.engine.llm_engine import LLMEngine
from fs_engine.llm import LLM
from fs_engine.request import RequestOutput
from fs_engine.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams", "__version__"]
