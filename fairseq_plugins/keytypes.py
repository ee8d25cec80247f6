"""Which key types (`--knn-keytype`) a checkpoint supports, checked on the model itself.

    python -m fairseq_plugins.keytypes CKPT [--data DATA_BIN] [KEYTYPE ...]
    python -m fairseq_plugins.keytypes CKPT --data DATA_BIN --output-state

Loads the checkpoint (the model only, on the CPU), attaches `fairseq_plugins.hooks.KeyCapture`
for each key type asked for (default: all of them) and runs one short forward pass: a key type
is supported when its hook can be attached and fires with states of the model's key dimension.
Prints the supported ones, one per line, in the order asked; each one left out is named on
stderr with the reason (e.g. decoder_output_ln on a pre-norm model without a final LayerNorm,
such as the WikiText-103 LM, transformer_lm_wiki103). Exits 2 when none is left.
`--output-state` prints the state the model's output layer reads (decoder_output_ln where
the model has a final LayerNorm, else decoder_output): the continuous cache's hidden state.
The scripts in scripts/wikitext103/ call this before any dump, so that a key type the model
lacks is dropped before hours of dumping rather than discovered after them.
"""

import argparse
import os
import sys

from knnlm.errors import ConfigError, KNNLMError

from .hooks import KEYTYPES, KeyCapture, final_layer, key_dim


def load_model(ckpt, data=None):
    """The checkpoint's model, on the CPU, in eval mode. `data`: a folder with its dict.txt
    (default: the checkpoint's folder; fairseq's archives ship it there)."""
    from fairseq import checkpoint_utils

    data = data or os.path.dirname(os.path.abspath(ckpt))
    if not os.path.exists(os.path.join(data, "dict.txt")):
        raise ConfigError(f"no dict.txt in {data}: pass --data DATA_BIN (the binarized data of {ckpt})")
    models, _ = checkpoint_utils.load_model_ensemble([ckpt], arg_overrides={"data": data})
    return models[0].eval()


def check_keytype(model, keytype):
    """None if `keytype` works on `model`, else the reason it does not."""
    import torch

    try:
        capture = KeyCapture(model, keytype)
    except ConfigError as e:
        return str(e)
    try:
        decoder, _ = final_layer(model)
        tokens = torch.full((1, 4), decoder.dictionary.eos() if hasattr(decoder, "dictionary") else 2, dtype=torch.long)
        with torch.no_grad():
            model(tokens)
        keys = capture.pop()
    except Exception as e:  # noqa: BLE001 - any failure means: not usable as a key
        return f"the forward pass did not give {keytype} states ({type(e).__name__}: {e})"
    finally:
        capture.remove()
    if keys.shape[-1] != key_dim(model):
        return f"{keytype} states have dimension {keys.shape[-1]}, not the model's {key_dim(model)}"
    return None


def output_keytype(model):
    """The state the output layer reads: after the final LayerNorm where the model has one."""
    decoder, layer = final_layer(model)
    if getattr(decoder, "layer_norm", None) is not None:
        return "decoder_output_ln"
    return "decoder_output"


def supported(model, keytypes=KEYTYPES):
    """[(keytype, None or the reason it is unsupported)] in the order given."""
    return [(kt, check_keytype(model, kt)) for kt in keytypes]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fairseq_plugins.keytypes", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("keytypes", nargs="*", help=f"key types to check (default: all: {' '.join(KEYTYPES)})")
    p.add_argument("--data", help="folder with the dict.txt of the checkpoint (default: its folder)")
    p.add_argument("--output-state", action="store_true", help="print the output layer's input state and exit")
    p.add_argument("--and-output-state", action="store_true",
                   help="after the supported key types, print output_state=KEYTYPE (one model load for both)")
    a = p.parse_intermixed_args(argv)
    try:
        unknown = [kt for kt in a.keytypes if kt not in KEYTYPES]
        if unknown:
            raise ConfigError(f"unknown key type(s) {', '.join(unknown)} (known: {', '.join(KEYTYPES)})")
        model = load_model(a.checkpoint, a.data)
        if a.output_state:
            print(output_keytype(model))
            return 0
        ok = []
        for kt, why in supported(model, a.keytypes or KEYTYPES):
            if why is None:
                ok.append(kt)
            else:
                print(f"key type {kt} left out: {a.checkpoint}: {why}", file=sys.stderr)
        if not ok:
            raise ConfigError(f"{a.checkpoint} supports none of the key types {' '.join(a.keytypes or KEYTYPES)}")
    except KNNLMError as e:
        print(f"{e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    print("\n".join(ok))
    if a.and_output_state:
        print(f"output_state={output_keytype(model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
