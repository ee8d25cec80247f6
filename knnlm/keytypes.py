"""The key types every front-end offers, by the paper's Table 5 names (all from the final block).

    last_ffn_input             feed-forward input after its norm (the paper's choice; default)
    last_ffn_input_before_ln   feed-forward input before that norm
    last_attn_input            self-attention input after its norm
    last_attn_input_before_ln  self-attention input before its norm (the block's input)
    decoder_output             the final block's output
    decoder_output_ln          the output after the final norm

Each front-end maps them onto its models' modules (fairseq_plugins/hooks.py, knnlm/hf/layers.py).
"""

KEYTYPES = (
    "last_ffn_input",
    "last_ffn_input_before_ln",
    "last_attn_input",
    "last_attn_input_before_ln",
    "decoder_output",
    "decoder_output_ln",
)
DEFAULT_KEYTYPE = "last_ffn_input"
