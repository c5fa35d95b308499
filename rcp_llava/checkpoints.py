"""Atomic Trainer checkpoints: a `checkpoint-N` folder exists only once it is complete.

`Trainer._save_checkpoint` writes the model, optimizer, scheduler, RNG states and `trainer_state.json` one after
the other into `checkpoint-N`; an interrupt (Ctrl-C, a killed job, a full disk) between them left a folder that
`get_last_checkpoint` picks and resuming then fails on. Here the same files are written into `tmp-checkpoint-N`
and the folder is renamed to `checkpoint-N` when the last one is written (a rename within one folder is atomic on
POSIX), so an interrupted save leaves the previous checkpoints as they were, plus a `tmp-` folder that the next save
at that step, or `AtomicCheckpointMixin` on the next run, removes.
"""

import os
import shutil

import transformers.trainer as hf_trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints


STAGING_PREFIX = "tmp-" + PREFIX_CHECKPOINT_DIR


class AtomicCheckpointMixin:
    """Mix into a `transformers.Trainer` subclass (before `Trainer` in the bases)."""

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}-{step}")
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by an interrupted save
        # `Trainer._save_checkpoint` names the folder from this module global when it runs: point it at the staging
        # name for the duration of the call (its rotation takes the prefix as a default argument and is unaffected).
        hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
        # The push (`push_to_hub`) reads the same global and the folder it is given, so inside the call it uploaded
        # the staging folder (gone once renamed; `all_checkpoints` named it tmp-checkpoint-N) and, ignoring
        # tmp-checkpoint-* only, every earlier checkpoint-N at the repo root: it runs below, on the final folder.
        self._push_from_checkpoint = lambda folder: None
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                self._save_checkpoint_extras(staging)  # inside the staging folder: complete, or not there at all
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR = PREFIX_CHECKPOINT_DIR
            del self._push_from_checkpoint  # the method again
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging folder
        # Every rank's state named the staging folder as the best checkpoint (`Trainer._save_checkpoint` sets it on
        # all ranks); renamed on the main process only, the others kept a path gone after the rename, and under
        # DDP `--load_best_model_at_end` failed on rank 1 ("no such folder 'tmp-checkpoint-N'") at the end.
        best_is_new = self.state.best_model_checkpoint == staging
        if best_is_new:
            self.state.best_model_checkpoint = final
        if self.args.should_save:
            if os.path.isdir(final):  # the same step saved before: a resume from an earlier checkpoint
                shutil.rmtree(final)
            os.replace(staging, final)
            if best_is_new:
                self.state.save_to_json(os.path.join(final, hf_trainer.TRAINER_STATE_NAME))
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)  # the main process only (the Trainer's own check)
        if self.args.should_save:
            # The rotation inside the call could not see the new checkpoint; count it now.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint_extras(self, folder):
        """Write the subclass's own files into the checkpoint being saved (`folder`, the staging folder; main process
        only). They are renamed into place with the Trainer's files, so a resume finds them in every checkpoint."""
