"""mlalm: small language models from Multi-head Latent Attention and DeepSeekMoE, in JAX."""

from mlalm.config import Config, load_config
from mlalm.errors import CheckpointError, ConfigError, DataError

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "ConfigError", "DataError", "CheckpointError"]
