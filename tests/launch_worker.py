"""scripts/train.py as a user runs it, plus one callback that saves each rank's parameters when training ends (for
tests/test_launch.py). Lightning's own launcher re-runs this file in the processes it starts, so they get the
callback too; everything else is the script's."""

import importlib.util
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

OUT = os.environ["LAUNCH_TEST_OUT"]


class SaveRankParameters(pl.Callback):
    def on_train_end(self, trainer, module):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        info = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "env_rank": os.environ.get("RANK"),
        }
        torch.save({"state": state, "info": info}, os.path.join(OUT, f"rank{trainer.global_rank}.pt"))


_init = pl.Trainer.__init__


def _with_callback(self, *args, callbacks=None, **kwargs):
    _init(self, *args, callbacks=[*(callbacks or []), SaveRankParameters()], **kwargs)


pl.Trainer.__init__ = _with_callback
# imported, not run with runpy: runpy would set sys.argv[0] to the script, and Lightning starts its children with
# sys.argv[0], which must stay this file
spec = importlib.util.spec_from_file_location(
    "train_script", Path(__file__).resolve().parents[1] / "scripts" / "train.py"
)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.main()
