"""occult_jax: cheaper expert parallelism for Mixture-of-Experts in JAX.

Route → plan → exchange → expert compute → exchange back → combine, with a deduplicated
("occult") exchange that sends each token to a device once, however many of its experts live there.
"""

from occult_jax.config import MoEConfig
from occult_jax.mesh import make_mesh
from occult_jax.moe import ExpertPlacement, MoELayer

__all__ = ["ExpertPlacement", "MoEConfig", "MoELayer", "make_mesh"]
__version__ = "0.1.0"
