"""`RcpTrainer` as a user of the stock Trainer and TRL drives it: the plug-ins a user froze stay frozen, stock options
the RCP loss cannot honour are refused, and a processor is enough to build the collator."""

import re

import pytest
import torch
from test_train import make_trainer, micro  # noqa: F401 (the fixture)

from train_rcp import RcpTrainer, RcpTrainingArguments


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return RcpTrainingArguments(**kwargs)


def test_plugins_a_user_froze_stay_frozen_and_the_others_train(micro, tmp_path):  # noqa: F811
    """RcpTrainer set every plug-in trainable: a repair-only fine-tune trained the pruners too."""
    model = micro[0]()
    for name, param in model.named_parameters():
        param.requires_grad_("repair" in name)
    pruners = {k: v.clone() for k, v in model.plugin_state_dict().items() if ".pruners." in k}
    adapters = {k: v.clone() for k, v in model.plugin_state_dict().items() if ".repair_adapters." in k}
    trainer = make_trainer(micro, tmp_path, model=model, max_steps=2, save_strategy="no")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".pruners." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.rcp_plugins."))
    trainer.train()
    after = model.plugin_state_dict()
    assert all(torch.equal(after[k], v) for k, v in pruners.items())
    assert any(not torch.equal(after[k], v) for k, v in adapters.items())


def test_plugins_all_frozen_for_inference_train_and_the_backbone_is_frozen(micro, tmp_path):  # noqa: F811
    model = micro[0]()
    for param in model.model.rcp_plugins.parameters():
        param.requires_grad_(False)  # as `load_adapter(..., is_trainable=False)` leaves them
    make_trainer(micro, tmp_path, model=model)
    assert all(p.requires_grad == n.startswith("model.rcp_plugins.") for n, p in model.named_parameters())


def test_stock_loss_options_the_rcp_loss_would_ignore_are_refused(micro, tmp_path):  # noqa: F811
    """Accepted and then ignored: the loss was bit-identical with label smoothing 0.1 or a `compute_loss_func`."""
    with pytest.raises(ValueError, match=r"`label_smoothing_factor=0.1` is not supported: RCP's task loss"):
        _args(tmp_path, label_smoothing_factor=0.1)
    # NEFTune noised the teacher's embeddings apart from the student's (the repair loss at initialisation went from
    # 1e-10 to 0.0018 on noise alone)
    with pytest.raises(ValueError, match=r"^`neftune_noise_alpha=5.0` is not supported: NEFTune's noise would differ "
                                         r"between the student and the full-token teacher"):
        _args(tmp_path, neftune_noise_alpha=5.0)
    make, processor, dataset = micro
    with pytest.raises(ValueError, match=r"`compute_loss_func` is not supported: RcpTrainer's loss is RCP's"):
        RcpTrainer(model=make(), args=_args(tmp_path), train_dataset=dataset, processing_class=processor,
                   compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


def test_a_processor_builds_the_collator_as_trl_does(micro, tmp_path):  # noqa: F811
    """Without `data_collator` the stock default failed at the first batch ("Could not infer dtype of
    PngImageFile"); with `processing_class` the trainer builds RCP's collator, and without either it says so."""
    make, processor, dataset = micro
    trainer = RcpTrainer(model=make(), args=_args(tmp_path), train_dataset=dataset, processing_class=processor)
    reference = make_trainer(micro, tmp_path / "given", max_steps=2, save_strategy="no")
    batch, expected = trainer.data_collator([dataset[0], dataset[1]]), reference.data_collator([dataset[0], dataset[1]])
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    trainer.train()
    with pytest.raises(ValueError, match=r"needs `data_collator=RcpDataCollator\(processor\)`"):
        RcpTrainer(model=make(), args=_args(tmp_path), train_dataset=dataset)


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_push_to_hub_while_training_uploads_the_checkpoint_and_the_plugins(micro, tmp_path, monkeypatch, strategy):  # noqa: F811
    """The atomic checkpoint's staging name leaked into the Trainer's push: the root upload ignored tmp-checkpoint-*
    only (every earlier checkpoint-N, optimizer included, went to the repo root), the checkpoint upload read the
    staging folder (renamed away right after, without grad_norms.json; `all_checkpoints` named it
    tmp-checkpoint-N), and the root never held the plug-ins (the push copies stock model files only)."""
    import fnmatch
    import os
    from types import SimpleNamespace

    import transformers.trainer as hf_trainer

    uploads = []

    class Api:  # records what each upload would send (the folder as it is when the upload is asked for)
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, **kwargs):
            files = sorted(os.path.relpath(os.path.join(root, f), folder_path)
                           for root, _, names in os.walk(folder_path) for f in names)
            files = [f for f in files if not any(fnmatch.fnmatch(f.split(os.sep)[0], p) for p in ignore_patterns or [])]
            uploads.append((folder_path, path_in_repo, files))
            return SimpleNamespace(done=lambda: True)

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: Api())
    trainer = make_trainer(micro, tmp_path, max_steps=4, save_steps=2, push_to_hub=True, hub_model_id="rcp-test",
                           hub_strategy=strategy)
    trainer.train()
    roots = [files for folder, where, files in uploads if folder == str(tmp_path) and where is None]
    assert len(roots) >= 2 and all({"rcp_plugins.safetensors", "rcp_config.json"} <= set(files) for files in roots)
    assert all(not f.startswith(("checkpoint-", "tmp-checkpoint-")) for files in roots for f in files)
    checkpoints = [(folder, where, files) for folder, where, files in uploads if folder != str(tmp_path)]
    if strategy == "every_save":
        assert checkpoints == []
    else:
        assert [folder for folder, _, _ in checkpoints] == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
        assert [where for _, where, _ in checkpoints] == (["last-checkpoint"] * 2 if strategy == "checkpoint"
                                                          else ["checkpoint-2", "checkpoint-4"])
        assert all("grad_norms.json" in files and "rcp_plugins.safetensors" in files for _, _, files in checkpoints)


def test_a_batch_without_an_image_trains_a_step_with_zero_plugin_gradients(tmp_path):
    """With no image no plug-in runs, so the loss had no graph and `Trainer.train` failed in backward ("element 0
    of tensors does not require grad"); a user's collator, or one micro-batch or rank of mixed data, can draw one."""
    from conftest import make_batch, make_model

    def collate(rows):
        batch = make_batch([(2, 5, False)] * len(rows))
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -3:] = batch["input_ids"][:, -3:]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    model = make_model(visual_token_budget=4, pruning_keep_counts=None)
    trainer = RcpTrainer(model=model, args=_args(tmp_path, max_steps=1, optim="sgd", weight_decay=0.0),
                         train_dataset=[{}] * 2, data_collator=collate)
    before = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["loss"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.plugin_state_dict().items())  # zero gradients


def test_the_backbones_dropout_is_off_in_the_teacher_and_the_student(micro, tmp_path):  # noqa: F811
    """In train mode a backbone with dropout drew other masks for the teacher than for the student: the repair loss
    chased that noise (1.3e-10 at initialisation without dropout, 8.6e-7 with attention dropout 0.1, a probe's
    numbers). Both passes now run the frozen backbone in eval mode: the loss equals the dropout-free model's, term
    by term, and every module's mode is as before afterwards."""
    from rcp_llava.data import RcpDataCollator

    make, processor, dataset = micro
    batch = RcpDataCollator(processor)([dataset[0], dataset[1]])
    results = []
    for p in (0.0, 0.5):
        trainer = make_trainer(micro, tmp_path / str(p), model=make(pruning_keep_counts=None), gumbel_noise=False,
                               save_strategy="no")
        model = trainer.model.train()
        attentions = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
        assert len(attentions) == model.config.text_config.num_hidden_layers
        for module in attentions:
            module.attention_dropout = p
        modes = {name: m.training for name, m in model.named_modules()}
        torch.manual_seed(int(p * 10))  # other draws for the two models
        loss = trainer.compute_loss(model, dict(batch))
        assert {name: m.training for name, m in model.named_modules()} == modes
        results.append((loss.item(), trainer._train_parts[-1][1]))
    (loss0, parts0), (loss5, parts5) = results
    assert parts0["retention"] == 1.0 and parts0["repair_loss"] < 1e-8  # initialisation: all kept, adapters no-op
    assert loss5 == loss0 and parts5 == parts0


def test_model_init_gives_a_fresh_model_set_up_for_rcp(micro, tmp_path):  # noqa: F811
    """`model_init` (fresh weights per `train()`, `hyperparameter_search`) was refused as "needs a model"; taken as
    the stock Trainer takes it, the rebuilt model would have skipped the setup (its backbone would train)."""
    make, processor, dataset = micro
    built = []

    def model_init():
        built.append(make())
        return built[-1]

    trainer = RcpTrainer(model_init=model_init, args=_args(tmp_path), train_dataset=dataset,
                         processing_class=processor)
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1]  # one in __init__, a fresh one for train()
    model = trainer.model
    assert all(p.requires_grad == n.startswith("model.rcp_plugins.") for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.model.rcp_plugins.parameters())
    fresh = make().state_dict()
    trained = model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in fresh.items() if ".rcp_plugins." not in k)
    assert any(not torch.equal(trained[k], v) for k, v in fresh.items() if ".rcp_plugins." in k)

    from transformers import LlavaConfig, LlavaForConditionalGeneration
    stock = make().config.to_dict()
    with pytest.raises(ValueError, match=r"needs an `RcpLlavaForConditionalGeneration` model, got "
                                         r"LlavaForConditionalGeneration from `model_init`\.$"):
        RcpTrainer(model_init=lambda: LlavaForConditionalGeneration(LlavaConfig(**{
            k: v for k, v in stock.items() if k in ("text_config", "vision_config", "image_token_id")})),
            args=_args(tmp_path), train_dataset=dataset, processing_class=processor)
    with pytest.raises(ValueError, match=r"needs an `RcpLlavaForConditionalGeneration` model \(`model=`, or "
                                         r"`model_init=` returning one\)"):
        RcpTrainer(args=_args(tmp_path), train_dataset=dataset, processing_class=processor)


def test_a_hyperparameter_search_trial_trains_with_its_own_values(micro, tmp_path, monkeypatch):  # noqa: F811
    """`train(trial=...)` builds the trial's model (`call_model_init`) before the trial's values reach the arguments
    (`_hp_search_setup`): the model's `detach_prior` was the previous trial's, and `repair_loss_layers` was parsed
    once when the arguments were built (a review of the model_init commit)."""
    from transformers.trainer_utils import HPSearchBackend

    make, processor, dataset = micro
    trainer = RcpTrainer(model_init=lambda trial=None: make(), args=_args(tmp_path, max_steps=1),
                         train_dataset=dataset, processing_class=processor)
    # what `hyperparameter_search` sets up with optuna (not installed here): a trial whose `hp_space` is its params
    import types

    import transformers.integrations

    trainer.hp_search_backend, trainer.hp_space = HPSearchBackend.OPTUNA, lambda trial: trial.params
    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: trial.params)
    for number, (detach, layers) in enumerate(((True, "0"), (False, "1"), (True, ""))):
        trainer.train(trial=types.SimpleNamespace(number=number, params={"detach_prior": detach,
                                                                         "repair_loss_layers": layers}))
        assert trainer.model.model.detach_prior is detach
        assert trainer.repair_layers_for_loss(trainer.model.config) == ([int(layers)] if layers else [1])
    # a trial's values are checked as the arguments' own are (the stock setup sets them with setattr): a negative
    # repair weight trained on a negative loss term
    for params, message in (({"lambda_repair": -1}, "`lambda_repair` must be a finite number >= 0, got -1.0."),
                            ({"gumbel_noise_ratio": 1.5}, "`gumbel_noise_ratio` must be in [0, 1], got 1.5.")):
        (name, _), = params.items()
        before = getattr(trainer.args, name)
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            trainer.train(trial=types.SimpleNamespace(number=3, params=params))
        setattr(trainer.args, name, before)  # the stock setup keeps a trial's values on the arguments
