"""Knowledge distillation: the loss, the frozen teacher, and how LitClassifier and lrl-train's settings use them."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lrlightning import Distillation, LowRankOptions, distillation_loss, frozen_teacher, plan_layers
from lrlightning.app.module import LitClassifier
from lrlightning.app.train import check_job


def test_distillation_loss_is_the_scaled_kl_divergence_and_vanishes_on_the_teachers_logits():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    temperature = 3.0
    p_teacher = torch.softmax(teacher / temperature, -1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean()
    loss = distillation_loss(student, teacher, temperature)
    torch.testing.assert_close(loss, expected * temperature ** 2)
    assert distillation_loss(teacher, teacher, temperature).abs().item() < 1e-6
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_the_blend_and_its_validation():
    student, teacher, task = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(2.0)
    kd = distillation_loss(student, teacher, 2.0)
    torch.testing.assert_close(Distillation(0.25, 2.0).loss(student, teacher, task), 0.75 * task + 0.25 * kd)
    torch.testing.assert_close(Distillation(0.0).loss(student, teacher, task), task)
    for kwargs, match in ((dict(weight=1.5), r"`Distillation.weight` must be a number in \[0, 1\], got 1.5"),
                          (dict(temperature=0), r"`Distillation.temperature` must be a number > 0, got 0")):
        with pytest.raises(ValueError, match=match):
            Distillation(**kwargs)


def test_a_frozen_teacher_is_an_independent_copy_without_gradients():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = frozen_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, teacher[0].weight)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_lit_classifier_distills_from_a_teacher_it_neither_saves_nor_exposes_to_the_callback():
    torch.manual_seed(0)
    student = LitClassifier("simple_cnn", num_classes=4, in_channels=3, scheduler="none")
    teacher = frozen_teacher(LitClassifier("simple_cnn", num_classes=4, in_channels=3).backbone)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    plain = student.training_step((x, y), 0)
    student.distill_from(teacher, weight=0.5, temperature=2.0)
    blended = student.training_step((x, y), 0)
    with torch.no_grad():
        kd = distillation_loss(student(x), teacher(x), 2.0)
    torch.testing.assert_close(blended, 0.5 * plain + 0.5 * kd)
    assert blended.requires_grad
    assert all(key.startswith(("backbone.", "train_acc", "val_acc", "test_acc")) for key in student.state_dict())
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())
    planned = plan_layers(student, LowRankOptions("svd", 0.5))[0]
    assert planned and all(plan.name.startswith("backbone.") for plan in planned)


VALID = {"baseline": None, "init_ckpt": None, "seed": 0, "latency_batch_sizes": [32]}


def test_lrl_train_distillation_needs_a_dense_teacher_and_valid_settings():
    check_job(OmegaConf.create({**VALID, "distill": {"weight": 0.0, "temperature": 4.0}}))
    check_job(OmegaConf.create({**VALID, "init_ckpt": "/runs/dense/last.ckpt", "distill": {"weight": 0.5}}))
    check_job(OmegaConf.create({**VALID, "baseline": "decompose_finetune", "distill": {"weight": 0.5}}))
    with pytest.raises(ValueError, match=r"`distill.weight`=0.5 needs a dense teacher: set `init_ckpt`"):
        check_job(OmegaConf.create({**VALID, "distill": {"weight": 0.5}}))
    with pytest.raises(ValueError, match=r"`Distillation.temperature` must be a number > 0, got -1"):
        check_job(OmegaConf.create({**VALID, "init_ckpt": "x.ckpt", "distill": {"weight": 0.5, "temperature": -1}}))
