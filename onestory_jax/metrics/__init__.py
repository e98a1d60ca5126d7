"""Story metrics: a registry of metric functions (:mod:`.registry`), the StoryWorld shot analysis
(:mod:`.shot_analysis`) and the StoryWorld metrics (:mod:`.storyworld_metrics`), its first entries.

Importing this package registers the built-in metrics; a module that adds metrics is imported here.
"""

from onestory_jax.metrics import storyworld_metrics  # registers C-Cons, E-Cons, ... (in this order)
from onestory_jax.metrics.registry import METRICS
from onestory_jax.metrics.registry import Metric
from onestory_jax.metrics.registry import StoryEval
from onestory_jax.metrics.registry import compute
from onestory_jax.metrics.registry import get
from onestory_jax.metrics.registry import names
from onestory_jax.metrics.registry import register_metric

__all__ = ["METRICS", "Metric", "StoryEval", "compute", "get", "names", "register_metric", "storyworld_metrics"]
