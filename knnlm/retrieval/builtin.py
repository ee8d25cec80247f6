"""The strategies and wrappers that ship with knnlm; importing this module registers them.

Wrappers compose in this order over the chosen strategy: adaptive retrieval, then RetoMaton. So
stacked, RetoMaton follows pointers where enough survive and asks adaptive retrieval for the
other tokens, which it searches or leaves to p_LM alone (the next token then has no pointers).
"""

from . import exact, faiss_search, sharded_search  # noqa: F401  strategies: exact, faiss (and faiss in parts)
from . import adaptive, retomaton  # noqa: F401  wrappers, in the order they wrap
