"""`RcpTrainer` as a user of the stock Trainer and TRL drives it: the plug-ins a user froze stay frozen, stock options
the RCP loss cannot honour are refused, and a processor is enough to build the collator."""

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
