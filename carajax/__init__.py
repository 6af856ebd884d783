"""carajax: multi-tenant LoRA serving for Llama-family models on JAX.

Users import from here, not from the private modules:

    engine = carajax.Engine.from_pretrained("carajax-demo")   # the built-in trained model
    engine.add_adapter("legal", "/path/to/peft_adapter_dir")
    outs = engine.generate(["Hello"], adapters=["legal"],
                           sampling=carajax.SamplingParams(max_tokens=16, temperature=0.0))

`carajax.demo` holds the built-in model's trained adapters and tasks.
"""

from carajax import demo
from carajax._version import __version__
from carajax.config import PRESETS, TARGET_MODULES, EngineConfig, ModelConfig, RopeScaling
from carajax.engine.engine import Engine
from carajax.engine.request import QueueFullError, RequestError, RequestHandle, RequestMetrics, RequestOutput
from carajax.engine.sampling import SamplingParams
from carajax.lora.adapter import AdapterError, LoraAdapter, load_adapter
from carajax.lora.spec import AdapterSpec
from carajax.models.weights import CheckpointError

__all__ = [
    "PRESETS", "TARGET_MODULES", "AdapterError", "AdapterSpec", "CheckpointError", "Engine",
    "EngineConfig",
    "LoraAdapter", "ModelConfig", "QueueFullError", "RequestError", "RequestHandle",
    "RequestMetrics", "RequestOutput", "RopeScaling",
    "SamplingParams", "__version__", "demo", "load_adapter",
]
