"""Where the kNN-LM key lives in each Hugging Face architecture: one row per `model_type`.

A row names, relative to the model (`AutoModelForCausalLM`), the list of decoder blocks and
the final norm, and, relative to the final block, its attention, the norm before it, its
feed-forward network and the norm before that. Key types (the paper's Table 5), all from the
final block:

    last_ffn_input             FFN input after its norm: the input of the block's FFN (default)
    last_ffn_input_before_ln   FFN input before that norm: the input of the FFN's norm (the
                               attention-residual output; GPT-NeoX's parallel residual feeds
                               the block's input to it instead)
    last_attn_input            self-attention input after its norm: the output of that norm
    last_attn_input_before_ln  self-attention input before its norm: the block's input
    decoder_output             the final block's output
    decoder_output_ln          the output of the final norm (what the LM head reads)

Post-norm OPT (`do_layer_norm_before=False`, opt-350m) normalizes after the residual: there
the FFN's input is the output of `self_attn_layer_norm`, whose input is then "before"; it has
no norm before attention and no final norm, so the two key types that need them are refused.

A new architecture is one row in `LAYERS` below (check it with tests/test_hf.py, which
recomputes every key type by hand).
"""

import dataclasses
from typing import Optional

from knnlm.errors import ConfigError
from knnlm.keytypes import DEFAULT_KEYTYPE, KEYTYPES  # noqa: F401  (the names, shared by every front-end)



@dataclasses.dataclass(frozen=True)
class Row:
    """Module paths of one architecture (dotted attribute names)."""

    layers: str                  # from the model: the ModuleList of decoder blocks
    attn: str                    # from the block: self-attention
    attn_norm: str               # from the block: the norm before self-attention
    ffn: str                     # from the block: the feed-forward network (or its first Linear)
    ffn_norm: str                # from the block: the norm before the FFN (pre-norm)
    final_norm: Optional[str]    # from the model: the norm after the last block
    pre_norm_flag: Optional[str] = None  # config attribute that is False for a post-norm variant
    parallel_residual_flag: Optional[str] = None  # config attribute: FFN reads the block's input


LAYERS = {
    "gpt2": Row(layers="transformer.h", attn="attn", attn_norm="ln_1", ffn="mlp", ffn_norm="ln_2",
                final_norm="transformer.ln_f"),
    "gpt_neox": Row(layers="gpt_neox.layers", attn="attention", attn_norm="input_layernorm", ffn="mlp",
                    ffn_norm="post_attention_layernorm", final_norm="gpt_neox.final_layer_norm",
                    parallel_residual_flag="use_parallel_residual"),
    "llama": Row(layers="model.layers", attn="self_attn", attn_norm="input_layernorm", ffn="mlp",
                 ffn_norm="post_attention_layernorm", final_norm="model.norm"),
    "mistral": Row(layers="model.layers", attn="self_attn", attn_norm="input_layernorm", ffn="mlp",
                   ffn_norm="post_attention_layernorm", final_norm="model.norm"),
    "qwen2": Row(layers="model.layers", attn="self_attn", attn_norm="input_layernorm", ffn="mlp",
                 ffn_norm="post_attention_layernorm", final_norm="model.norm"),
    "opt": Row(layers="model.decoder.layers", attn="self_attn", attn_norm="self_attn_layer_norm", ffn="fc1",
               ffn_norm="final_layer_norm", final_norm="model.decoder.final_layer_norm",
               pre_norm_flag="do_layer_norm_before"),
}


def check_keytype(keytype):
    if keytype not in KEYTYPES:
        raise ConfigError(f"--knn-keytype must be one of {', '.join(KEYTYPES)}, got {keytype!r}")


def row_for(model):
    """The table row of `model` (by `model.config.model_type`), or a ConfigError naming what to add."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYERS:
        raise ConfigError(
            f"knnlm-hf does not know where the kNN-LM key is in model_type {model_type!r} "
            f"({type(model).__name__}): add a row for {model_type!r} to LAYERS in knnlm/hf/layers.py "
            f"naming its decoder blocks, attention, FFN, their norms and the final norm (known: "
            f"{', '.join(sorted(LAYERS))})"
        )
    return LAYERS[model_type]


def _get(root, path, model, what):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            raise ConfigError(
                f"{type(model).__name__} has no {what} at '{path}' (knnlm/hf/layers.py's row for "
                f"{model.config.model_type!r}): fix the row for this version of transformers"
            )
    return obj


def final_block(model):
    row = row_for(model)
    layers = _get(model, row.layers, model, "decoder blocks")
    if len(layers) == 0:
        raise ConfigError(f"{type(model).__name__} has no decoder blocks: no key to capture")
    return layers[-1]


def locate(model, keytype=DEFAULT_KEYTYPE):
    """(module, where) whose state is the key: where is "input" (a forward pre-hook reads the
    module's first input) or "output" (a forward hook reads its output)."""
    check_keytype(keytype)
    row = row_for(model)
    block = final_block(model)
    config = model.config
    pre_norm = True if row.pre_norm_flag is None else bool(getattr(config, row.pre_norm_flag, True))
    part = lambda path, what: _get(block, path, model, what)  # noqa: E731
    if keytype == "last_ffn_input":
        return part(row.ffn, "feed-forward network"), "input"
    if keytype == "last_ffn_input_before_ln":
        return part(row.ffn_norm if pre_norm else row.attn_norm, "FFN norm"), "input"
    if keytype == "last_attn_input":
        if not pre_norm:
            raise ConfigError(f"--knn-keytype last_attn_input: this post-norm {config.model_type} model has no "
                              f"norm before self-attention; use last_attn_input_before_ln")
        return part(row.attn_norm, "attention norm"), "output"
    if keytype == "last_attn_input_before_ln":
        return block, "input"
    if keytype == "decoder_output":
        return block, "output"
    final = None
    if row.final_norm is not None:
        try:
            final = _get(model, row.final_norm, model, "final norm")
        except ConfigError:
            final = None
    if final is None:
        raise ConfigError(f"--knn-keytype decoder_output_ln: this {config.model_type} model has no final "
                          f"norm; use decoder_output")
    return final, "output"


def key_dim(model):
    """The key dimension: the model's hidden size (every key type above has it)."""
    config = model.config
    dim = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not dim:
        raise ConfigError(f"{type(model).__name__}'s config has no hidden_size: cannot size the keys")
    return int(dim)


def max_positions(model):
    """The longest window the model accepts (None if its config does not say)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
