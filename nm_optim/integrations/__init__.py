"""Watching nm_optim.SGD train, live, in the tools people already use.

    common        the scalars of one recorded step (no optional dependency): per-parameter norms
                  of θ, g and the momentum buffer v, each symmetry's conserved quantity, the
                  hyper-parameters; `ScalarSource` reads them every N steps at O(1) cost per read
                  (Recorder.latest), whatever the length of the run
    tensorboard   TensorBoardLogger: writes them with torch.utils.tensorboard (needs tensorboard:
                  pip install 'nm_optim[tensorboard]'); `nm-optim train --tensorboard DIR`
    lightning     NMOptimCallback for Lightning's Trainer: pl_module.log_dict when the trainer
                  logs (log_every_n_steps); the recorders' state in its checkpoints, so
                  fit(ckpt_path=...) continues the record
    huggingface   NMOptimTrainerCallback for transformers' Trainer: to its report_to
                  integrations when it logs (logging_steps), not the console nor log_history;
                  the recorder's state in each checkpoint folder, loaded when train() resumes

The framework modules import their framework when imported; this package imports none of them.
"""

from nm_optim.integrations.common import ScalarSource, step_scalars

__all__ = ["ScalarSource", "step_scalars"]
