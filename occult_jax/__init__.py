"""occult_jax: cheaper expert parallelism for Mixture-of-Experts in JAX.

Route → plan → exchange → expert compute → exchange back → combine, with a deduplicated
("occult") exchange that sends each token to a device once, however many of its experts live there.
"""

from occult_jax.config import MoEConfig
from occult_jax.mesh import make_mesh
from occult_jax.moe import ExpertPlacement, MoELayer
from occult_jax.relocate import apply_placement, moe_layer_paths, slots_from_devices

__all__ = ["ExpertPlacement", "MoEConfig", "MoELayer", "apply_placement", "make_mesh",
           "moe_layer_paths", "slots_from_devices"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`oj.placement` and `oj.hf` load on first use: `python -m occult_jax.placement` imports
    it once, and importing occult_jax stays light."""
    if name in ("placement", "hf"):
        import importlib

        return importlib.import_module(f"occult_jax.{name}")
    raise AttributeError(f"module 'occult_jax' has no attribute {name!r}")
