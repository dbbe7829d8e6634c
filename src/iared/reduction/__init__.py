"""Token policies: the IA-RED² interpreter, ATS and the baselines, on one interface.

Importing this package registers every policy by name (see `policy.register_policy`).
"""

from . import interpreter  # noqa: F401  (registers "iared")
from . import video_baselines  # noqa: F401  (registers "tempdiff")
from . import evit  # noqa: F401  (registers "evit")
from . import tome  # noqa: F401  (registers "tome")
from . import ats, baselines  # noqa: F401  (register "ats", "ats_single", "topk", "ats_selfattn", "ats_nocls", "random", "attention")
from ..backbones.tokens import Tokens, apply_keep, to_grid
from .interpreter import IARedPolicy, MultiHeadInterpreter, informative_scores, log_keep_drop
from .policy import TokenPolicy, available_policies, build_policy, register_policy

__all__ = [
    "IARedPolicy", "MultiHeadInterpreter", "TokenPolicy", "Tokens", "apply_keep", "available_policies",
    "build_policy", "informative_scores", "log_keep_drop", "register_policy", "to_grid",
]
