"""Capture the kNN-LM key from a Hugging Face causal LM with forward hooks.

    capture = break_into(model, "last_ffn_input")   # hooks attached; the model is unchanged
    model(input_ids)
    keys = capture.pop()                             # (B, T, D), the last forward's
    break_out(capture)                               # hooks removed: the plain model again

or `with break_into(model) as capture: ...`. Where the key is comes from knnlm/hf/layers.py.
"""

import torch

from knnlm.errors import ConfigError

from .layers import DEFAULT_KEYTYPE, final_block, key_dim, locate


def _first_tensor(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"]
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v):
            return v
    return None


class KeyCapture:
    """Records the chosen state of `model`'s final block on every forward, as (B, T, D)."""

    def __init__(self, model, keytype=DEFAULT_KEYTYPE):
        module, where = locate(model, keytype)
        self.model, self.keytype, self.dim = model, keytype, key_dim(model)
        self.keys = None
        self._shape = None
        block = final_block(model)
        # The block's input fixes (B, T): some blocks (OPT's) flatten to (B*T, D) before the FFN.
        self._handles = [block.register_forward_pre_hook(self._block_input, with_kwargs=True)]
        if where == "input":
            self._handles.append(module.register_forward_pre_hook(self._from_input, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(self._from_output))

    def _block_input(self, module, args, kwargs):
        x = _first_tensor(args, kwargs)
        self._shape = None if x is None else tuple(x.shape[:-1])

    def _store(self, x):
        if x is None:
            raise RuntimeError(f"the {self.keytype} hook saw no tensor")
        x = x.detach()
        if x.dim() == 2 and self._shape is not None and len(self._shape) == 2:
            x = x.reshape(*self._shape, x.shape[-1])
        self.keys = x

    def _from_input(self, module, args, kwargs):
        self._store(_first_tensor(args, kwargs))

    def _from_output(self, module, args, output):
        self._store(output[0] if isinstance(output, (tuple, list)) else output)

    def pop(self):
        """The keys of the last forward, (B, T, D); an error if the hook did not fire since the last pop."""
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("the key hook did not fire: the model's forward skipped the final block")
        if keys.shape[-1] != self.dim:
            raise ConfigError(f"captured {self.keytype} states of width {keys.shape[-1]}, expected the hidden "
                              f"size {self.dim}: knnlm/hf/layers.py's row for {self.model.config.model_type!r} "
                              f"points at the wrong module")
        return keys

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.keys = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def break_into(model, keytype=DEFAULT_KEYTYPE):
    """Attach the key hooks to `model`; returns the KeyCapture (also a context manager)."""
    return KeyCapture(model, keytype)


def break_out(capture):
    """Remove the hooks `break_into` attached: the model computes exactly as before."""
    capture.remove()
