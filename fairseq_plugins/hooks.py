"""Capture the kNN-LM key from a fairseq transformer decoder with forward hooks.

No model code is changed: a hook on the final decoder layer records one state per forward.
Key types (the paper's Table 5), all from the final layer:

    last_ffn_input             FFN input after its LayerNorm (the paper's choice; default)
    last_ffn_input_before_ln   FFN input before that LayerNorm
    last_attn_input            self-attention input after its LayerNorm
    last_attn_input_before_ln  self-attention input before its LayerNorm (the layer's input)
    decoder_output             the final layer's output
    decoder_output_ln          the decoder output after the final LayerNorm

"After LayerNorm" holds for pre-norm and post-norm layers alike: in a post-norm layer the
FFN input is the output of the attention block's LayerNorm, whose input is then "before".
"""

from knnlm.errors import ConfigError
from knnlm.keytypes import KEYTYPES  # noqa: F401  (the names, shared by every front-end)



def final_layer(model):
    decoder = getattr(model, "decoder", model)
    layers = getattr(decoder, "layers", None)
    if not layers:
        raise ConfigError(
            f"cannot capture kNN-LM keys from {type(model).__name__}: expected a fairseq "
            f"transformer decoder with .decoder.layers"
        )
    return decoder, layers[-1]


def key_dim(model):
    _, layer = final_layer(model)
    return layer.fc1.in_features


class KeyCapture:
    """Records the chosen state of `model`'s final layer on every forward, as (B, T, C)."""

    def __init__(self, model, keytype="last_ffn_input"):
        if keytype not in KEYTYPES:
            raise ConfigError(f"--knn-keytype must be one of {', '.join(KEYTYPES)}, got {keytype!r}")
        self.keytype = keytype
        self.keys = None
        decoder, layer = final_layer(model)
        pre_norm = getattr(layer, "normalize_before", True)
        if keytype == "last_ffn_input":
            handle = layer.fc1.register_forward_pre_hook(self._from_input)
        elif keytype == "last_ffn_input_before_ln":
            ln = layer.final_layer_norm if pre_norm else layer.self_attn_layer_norm
            handle = ln.register_forward_pre_hook(self._from_input)
        elif keytype == "last_attn_input":
            handle = layer.self_attn.register_forward_pre_hook(self._from_query, with_kwargs=True)
        elif keytype == "last_attn_input_before_ln":
            handle = layer.register_forward_pre_hook(self._from_input)
        elif keytype == "decoder_output":
            handle = layer.register_forward_hook(self._from_output)
        else:  # decoder_output_ln
            if getattr(decoder, "layer_norm", None) is not None:
                handle = decoder.layer_norm.register_forward_hook(self._from_output)
            elif not pre_norm:
                handle = layer.register_forward_hook(self._from_output)  # post-norm output is normalized
            else:
                raise ConfigError(
                    "--knn-keytype decoder_output_ln: this pre-norm model has no final LayerNorm "
                    "(--no-decoder-final-norm); use decoder_output"
                )
        self._handle = handle

    def _store(self, x):
        # fairseq's decoder layers run time-major (T, B, C); keys are (B, T, C) like the targets.
        self.keys = x.detach().transpose(0, 1)

    def _from_input(self, module, args):
        self._store(args[0])

    def _from_query(self, module, args, kwargs):
        self._store(kwargs["query"] if "query" in kwargs else args[0])

    def _from_output(self, module, args, output):
        self._store(output[0] if isinstance(output, tuple) else output)

    def pop(self):
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("the key hook did not fire: the model's forward skipped the final layer")
        return keys

    def remove(self):
        self._handle.remove()
