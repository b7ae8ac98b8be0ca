"""DER++, ER-ACE, A-GEM, MAS and the active-outputs head, on a tiny model and synthetic tasks."""

import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import run
from test_methods import TASKS, model, same, train

from music.data import task_split_classes
from music.evaluation import PhaseEvaluation
from music.methods import AGEM, DERPP, ERACE, MAS, Task
from music.methods.base import trainable
from music.fisher import per_sample_gradient_magnitudes
from music.methods.mas import squared_output_norm
from music.module import Classifier


def test_derpp_stores_logits_at_insertion_and_replays_them_unchanged():
    derpp = DERPP(budget=1000, alpha=1.0, beta=0.0)
    net = model([derpp])
    net.train()
    x, y = TASKS[0].dataset.images[:16], TASKS[0].dataset.labels[:16]
    logits = net(x)
    assert derpp.loss(net, x, y, logits) is None  # nothing to replay yet; the batch is stored
    assert torch.equal(derpp.images, x) and torch.equal(derpp.labels, y) and torch.equal(derpp.logits, logits.detach())
    stored = derpp.logits.clone()
    train(net, TASKS[1:], steps=10)  # the network moves on; the memory grows by reservoir
    assert torch.equal(derpp.logits[:16], stored) and not torch.allclose(net(x), stored)
    derpp.batch_size = len(derpp)  # the whole memory: the mean is the same in any order
    x2, y2 = TASKS[1].dataset.images[:8], TASKS[1].dataset.labels[:8]
    expected = F.mse_loss(net(derpp.images), derpp.logits)
    assert derpp.loss(net, x2, y2, net(x2)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_derpp_adds_the_memory_labels_cross_entropy_with_beta():
    derpp = DERPP(budget=1000, alpha=0.0, beta=2.0)
    net = model([derpp])
    net.train()
    x, y = TASKS[0].dataset.images, TASKS[0].dataset.labels
    derpp.remember_batch(images=x, labels=y, logits=torch.zeros(len(y), 4))
    derpp.batch_size = len(derpp)
    term = derpp.loss(net, x[:4], y[:4], net(x[:4]))
    assert term.item() == pytest.approx(2.0 * F.cross_entropy(net(x), y).item(), rel=1e-5)


def test_reservoir_keeps_a_uniform_sample_within_its_budget():
    derpp = DERPP(budget=10)
    for task in TASKS:
        for start in range(0, len(task.dataset), 16):
            x = task.dataset.images[start:start + 16]
            derpp.remember_batch(images=x, labels=task.dataset.labels[start:start + 16], logits=x)
    assert len(derpp) == 10 and derpp.seen == 96
    assert torch.equal(derpp.logits, derpp.images)  # each sample's tensors stay together
    data = {tuple(v.tolist()) for t in TASKS for v in t.dataset.images}
    assert {tuple(v.tolist()) for v in derpp.images} <= data
    assert set(derpp.labels.tolist()) & {2, 3}  # later samples replace earlier ones


def test_er_ace_masks_exactly_the_classes_not_in_the_batch():
    er_ace = ERACE(budget=1000)
    net = model([er_ace])
    net.train()
    logits = torch.randn(3, 4)
    y = torch.tensor([0, 2, 2])
    masked = er_ace.batch_logits(net, logits, y)
    assert torch.isinf(masked[:, [1, 3]]).all() and torch.equal(masked[:, [0, 2]], logits[:, [0, 2]])
    x = TASKS[0].dataset.images[:8]
    y = torch.tensor([0] * 8)
    y[:3] = 1
    out = net(x)
    only_present = F.cross_entropy(out[:, :2], y)  # classes 2 and 3 are not in the batch
    assert net.objective(out, y, x).item() == pytest.approx(only_present.item(), rel=1e-6)  # empty memory
    pick = torch.tensor([0, 1, 30, 31])  # two samples of class 2, two of class 3
    x2, y2 = TASKS[1].dataset.images[pick], TASKS[1].dataset.labels[pick]
    assert y2.tolist() == [2, 2, 3, 3]
    er_ace.batch_size = len(er_ace)  # the 8 samples just streamed in
    out2 = net(x2)
    expected = F.cross_entropy(out2[:, 2:], y2 - 2) + F.cross_entropy(net(x), y)  # the replay: all classes
    assert net.objective(out2, y2, x2).item() == pytest.approx(expected.item(), rel=1e-5)


def gradient(net):
    return torch.cat([p.grad.flatten() for p in trainable(net).values()])


def reference_gradient(net, x, y):
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return gradient(net)


@pytest.mark.parametrize("conflict", [True, False], ids=["conflicting", "agreeing"])
def test_agem_projects_a_conflicting_gradient_onto_the_memory_gradients_half_space(conflict):
    agem = AGEM(budget_per_class=5, budget=None, batch_size=None)  # the whole memory: the reference is exact
    net = model([agem])
    train(net, TASKS[:1], steps=20)
    memory_x, memory_y = agem.images, agem.labels
    g_ref = reference_gradient(net, memory_x, memory_y)
    y = 1 - memory_y if conflict else memory_y  # swapped labels pull against the memory
    net.zero_grad()
    F.cross_entropy(net(memory_x), y).backward()
    g = gradient(net)
    net.on_before_optimizer_step(None)  # as Lightning calls it, between backward and step
    projected = gradient(net)
    if conflict:
        assert torch.dot(g, g_ref) < 0
        torch.testing.assert_close(projected, g - torch.dot(g, g_ref) / torch.dot(g_ref, g_ref) * g_ref)
        assert torch.dot(projected, g_ref) >= -1e-5 * g_ref.norm() * g.norm()
    else:
        assert torch.dot(g, g_ref) > 0 and torch.equal(projected, g)


def test_agem_leaves_the_gradient_alone_when_the_memory_gradient_underflows(monkeypatch):
    """A memory the network fits with saturated confidence has a reference gradient whose
    square underflows to 0 in float32: the projection would divide by it."""
    agem = AGEM(budget_per_class=5, budget=None, batch_size=None)
    net = model([agem])
    train(net, TASKS[:1], steps=5)
    params = list(trainable(net).values())
    monkeypatch.setattr(torch.autograd, "grad", lambda loss, inputs, **kw: [torch.full_like(p, 1e-30) for p in inputs])
    for p in params:
        p.grad = -torch.ones_like(p)  # against the (vanishing) memory gradient: g . g_ref < 0
    net.on_before_optimizer_step(None)
    assert all(torch.equal(p.grad, -torch.ones_like(p)) for p in params)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm():
    mas = MAS(lambda_=2.0)
    net = model([mas])
    task = Task(0, "a", [0, 1], TASKS[0].dataset)
    omega = mas.importance(net, task)
    x = task.dataset.images
    by_hand = {name: torch.zeros_like(p) for name, p in trainable(net).items()}
    for sample in x:
        net.zero_grad()
        net(sample.unsqueeze(0)).pow(2).sum().backward()  # ||f(x)||_2^2 of one sample
        for name, p in trainable(net).items():
            by_hand[name] += p.grad.abs() / len(x)
    vmapped = per_sample_gradient_magnitudes(net.backbone, trainable(net), x, task.dataset.labels, squared_output_norm, "abs")
    for name in by_hand:
        torch.testing.assert_close(omega[name], by_hand[name])
        torch.testing.assert_close(vmapped[name] / len(x), by_hand[name])
    mas.end_task(net, task)
    mas.end_task(net, task)  # accumulated over tasks, anchored at the latest weights
    assert len(mas.importances) == 1
    torch.testing.assert_close(mas.importances[0]["fc1.weight"], 2 * by_hand["fc1.weight"])
    with torch.no_grad():
        net.backbone.fc1.weight += 0.1
    expected = 2.0 * (2 * by_hand["fc1.weight"] * 0.01).sum()
    assert mas.loss(net, x, None, None).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("build", [lambda: DERPP(alpha=0, beta=0), lambda: AGEM(budget=0), lambda: MAS(lambda_=0)],
                         ids=["derpp", "agem", "mas"])
def test_a_method_at_strength_zero_is_naive_fine_tuning(build):
    assert same(train(model())[-1], train(model([build()]))[-1])


def fit(build, interrupt: bool):
    """Task 0, then task 1 in two halves; ``interrupt``: between the halves, the model, the
    optimizer and the method go through a ``weights_only`` checkpoint into fresh objects."""
    method = build()
    net = model([method])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(1)

    def steps(task, n):
        for _ in range(n):
            pick = torch.randperm(len(task.dataset), generator=generator)[:16]
            x, y = task.dataset.images[pick], task.dataset.labels[pick]
            loss = net.objective(net(x), y, x)
            optimizer.zero_grad()
            loss.backward()
            net.on_before_optimizer_step(optimizer)
            optimizer.step()

    method.start_task(net, TASKS[0])
    steps(TASKS[0], 10)
    method.end_task(net, TASKS[0])
    method.start_task(net, TASKS[1])
    steps(TASKS[1], 5)
    if interrupt:
        buffer = io.BytesIO()
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict()}
        torch.save(state, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        method = build()
        net = model([method])
        net.load_state_dict(saved["model"])
        optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
        optimizer.load_state_dict(saved["optimizer"])
        method.load_state_dict(saved["method"])
    steps(TASKS[1], 5)
    method.end_task(net, TASKS[1])
    return {k: v.detach().clone() for k, v in trainable(net).items()}, method.state_dict()


@pytest.mark.parametrize("build", [lambda: DERPP(budget=20), lambda: ERACE(budget=20),
                                   lambda: AGEM(budget=10, batch_size=8), lambda: MAS(lambda_=10.0)],
                         ids=["derpp", "er_ace", "agem", "mas"])
def test_resume_from_a_checkpoint_mid_task_equals_an_uninterrupted_run(build):
    (weights, state), (resumed_weights, resumed_state) = fit(build, False), fit(build, True)
    assert same(weights, resumed_weights)
    assert equal(state, resumed_state)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b))
    return a == b


class Phases:
    """The schedule and data module as the model's ``on_phase_start`` reads them."""

    def __init__(self, *splits):
        self.phases = [SimpleNamespace(split=s) for s in splits]
        self.online = False
        classes = {"remaining": [0, 1, 2, 3], "class_3": [3]}
        self.trainer = SimpleNamespace(datamodule=SimpleNamespace(
            task_classes=lambda split: task_split_classes(split) or classes[split]))

    def start(self, net, index):
        net.on_phase_start(self.trainer, net, self, index)


def test_active_outputs_train_only_the_classes_seen_so_far_where_the_reference_protocol_applies():
    net = model()
    schedule = Phases("classes_0_1", "classes_2_3")
    logits = torch.zeros(2, 4)
    y = torch.tensor([0, 1])
    schedule.start(net, 0)
    masked = net.scenario_logits(logits, y)
    assert torch.isinf(masked[:, 2:]).all() and torch.equal(masked[:, :2], logits[:, :2])
    assert torch.equal(net.scenario_logits(logits, y, active=False), logits)  # evaluation scores all outputs
    schedule.start(net, 1)
    assert torch.equal(net.scenario_logits(logits, y), logits)  # all four seen
    pretrained = Phases("remaining", "class_3")  # the 3 -> 4 -> 7 sequence: off by default
    pretrained.start(net, 1)
    assert torch.equal(net.scenario_logits(logits, y), logits)
    forced = Classifier(net.backbone, num_classes=4, active_outputs=True)
    Phases("class_3", "classes_0_1").start(forced, 0)
    assert torch.isinf(forced.scenario_logits(torch.zeros(1, 4), torch.tensor([3]))[0, :3]).all()
    off = Classifier(net.backbone, num_classes=4, active_outputs=False)
    schedule.start(off, 0)
    assert torch.equal(off.scenario_logits(logits, y), logits)
    finetuned = Classifier(net.backbone, num_classes=4, init_from="pretrained.ckpt")
    schedule.start(finetuned, 0)
    assert torch.equal(finetuned.scenario_logits(logits, y), logits)


@pytest.mark.parametrize("build, match", [
    (lambda: DERPP(budget=-1), r"budget=-1.*>= 0"),
    (lambda: DERPP(alpha=-0.5), r"alpha=-0.5.*>= 0"),
    (lambda: DERPP(beta=float("nan")), r"beta=nan.*>= 0"),
    (lambda: ERACE(weight=-1), r"weight=-1.*>= 0"),
    (lambda: ERACE(batch_size=0), r"batch_size=0.*>= 1"),
    (lambda: AGEM(budget_per_class=10), r"budget_per_class=10, budget=500: give exactly one"),
    (lambda: AGEM(budget=-3), r"budget=-3.*>= 0"),
    (lambda: MAS(lambda_=-1), r"lambda_=-1.*MAS strength must be >= 0"),
    (lambda: MAS(samples=0), r"samples=0.*>= 1"),
    (lambda: Classifier(scenario="task", active_outputs=True), r"active_outputs=True.*scenario='task'"),
], ids=["derpp budget", "alpha", "beta", "er_ace weight", "er_ace batch", "agem budgets", "agem budget", "mas lambda",
        "mas samples", "active outputs"])
def test_bad_settings_fail_with_one_line(build, match):
    with pytest.raises(ValueError, match=match):
        build()


REHEARSAL = ("[{class_path: music.methods.AGEM, init_args: {budget: 40, batch_size: 16}}, "
             "{class_path: music.methods.DERPP, init_args: {budget: 40}}, "
             "{class_path: music.methods.ERACE, init_args: {budget: 40}}]")


def test_rehearsal_methods_in_lightning_train_the_same_with_or_without_blocks(shrink):
    """A-GEM's projection runs inside Lightning's optimizer step (automatic optimization) and
    inside the direct steps of blocks alike; DER++ and ER-ACE store as they train. Split-MNIST
    trains with active outputs: after the second task, the four classes seen."""
    phases = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", phases=phases, iterations_per_epoch=6, batch_size=32, batches_per_block=3)

    def fit(name, *args):
        cli = run("fit", "--config", config, "--trainer.logger.init_args.version", name, *args)
        return next(c for c in cli.trainer.callbacks if isinstance(c, PhaseEvaluation)).rows, cli

    naive, _ = fit("naive", "--data.batches_per_block", "1")
    blocks, cli = fit("blocks", "--model.methods", REHEARSAL)
    batches, _ = fit("batches", "--model.methods", REHEARSAL, "--data.batches_per_block", "1")
    assert blocks == batches and blocks != naive
    agem, derpp, er_ace = cli.model.methods
    assert torch.bincount(agem.labels).tolist() == [20, 20]  # task 1's classes, stored at its end
    assert derpp.seen == er_ace.seen == 12 * 32 and len(derpp) == len(er_ace) == 40  # every batch streamed
    assert cli.model._active.tolist() == [True] * 4 + [False] * 6
