"""Save a randomly initialised fairseq LM as a checkpoint eval_lm can load.

fairseq's adaptive-softmax training breaks under current torch (an in-place op on a
LogSoftmax output in its backward), but inference works; a dump test needs no trained
weights, only the architecture. Usage: python untrained_lm.py DATA OUT.pt [fairseq-train args]
"""

import sys

import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf


def save_untrained(data, out, extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--task", "language_modeling", *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    model = task.build_model(cfg.model)
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "untrained",
                "lr_scheduler_state": {}, "num_updates": 0}]
    checkpoint_utils.torch_persistent_save(
        {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
         "model": model.state_dict(), "optimizer_history": history, "extra_state": {}},
        out,
    )


if __name__ == "__main__":
    save_untrained(sys.argv[1], sys.argv[2], sys.argv[3:])
