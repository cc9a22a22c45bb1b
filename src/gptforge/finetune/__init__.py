"""Fine-tuning on labeled data: SFT with prompt masking and GPT-1-style classification, on the one training loop.

`formats` reads the data files, `source` turns tokenized examples into micro-batches, `tasks` builds the
`train.loop.Task` and holds the `finetune` entry point, `predict` runs a trained classifier. See
docs/finetuning.md. The package itself is callable, so that `gptforge.finetune(cfg, data, run_dir, init=...)`
works although `gptforge.finetune` names this package (Python binds a subpackage to its parent's attribute).
"""

import sys
import types

from gptforge.finetune.tasks import finetune

__all__ = ["finetune"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
