"""The strategies and wrappers that ship with knnlm; importing this module registers them.

Wrappers compose in this order over the chosen strategy: RetoMaton, then adaptive retrieval.
"""

from . import exact, faiss_search, sharded_search  # noqa: F401  strategies: exact, faiss (and faiss in parts)
from . import retomaton, adaptive  # noqa: F401  wrappers, in the order they wrap
