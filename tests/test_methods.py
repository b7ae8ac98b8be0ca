"""Continual-learning methods on a tiny model and synthetic tasks, where each effect is known."""

import copy

import pytest
import torch
import torch.nn.functional as F

from music.data import InMemoryDataset
from music.fisher import per_sample_gradient_magnitudes
from music.methods import EWC, SI, LwF, OnlineEWC, Replay, Task
from music.methods.base import trainable
from music.methods.ewc import diagonal_fisher
from music.models import SimpleNN
from music.module import Classifier


def blobs(classes, n=24, seed=0):
    """``n`` samples per class of Gaussian blobs in 4-D, one centre per class."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(4) * 3
    x = torch.cat([centres[c] + torch.randn(n, 4, generator=generator) for c in classes])
    y = torch.tensor([c for c in classes for _ in range(n)])
    return InMemoryDataset(x, y)


TASKS = [Task(0, "a", [0, 1], blobs([0, 1])), Task(1, "b", [2, 3], blobs([2, 3], seed=1))]


def model(methods=(), scenario="class", tasks=None):
    torch.manual_seed(0)
    return Classifier(SimpleNN(in_features=4, hidden=(8, 8), num_classes=4), num_classes=4,
                      methods=list(methods), scenario=scenario, tasks=tasks)


def train(net, tasks=TASKS, steps=40, batch=16):
    """Task after task, as the Classifier's training loop calls the methods: start_task, then
    per batch objective -> zero_grad -> backward -> the step hook -> step, then end_task."""
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(1)
    snapshots = []
    for task in tasks:
        for method in net.methods:
            method.start_task(net, task)
        for _ in range(steps):
            pick = torch.randperm(len(task.dataset), generator=generator)[:batch]
            x, y = task.dataset.images[pick], task.dataset.labels[pick]
            loss = net.objective(net(x), y, x)
            optimizer.zero_grad()
            loss.backward()
            net.on_before_optimizer_step(optimizer)
            optimizer.step()
        for method in net.methods:
            method.end_task(net, task)
        snapshots.append({k: v.detach().clone() for k, v in trainable(net).items()})
    return snapshots


def distance(a, b):
    return sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt().item()


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", [EWC(lambda_=0), OnlineEWC(lambda_=0), SI(c=0), LwF(weight=0),
                                    Replay(budget_per_class=0), Replay(budget=0, selection="reservoir")],
                         ids=["ewc", "online_ewc", "si", "lwf", "replay", "reservoir"])
def test_a_method_at_strength_zero_is_naive_fine_tuning(method):
    assert same(train(model())[-1], train(model([method]))[-1])


@pytest.mark.parametrize("method", [EWC(lambda_=1e6), OnlineEWC(lambda_=1e6), SI(c=1e6)], ids=["ewc", "online_ewc", "si"])
def test_a_huge_penalty_keeps_the_weights_that_matter_to_the_first_task(method):
    """Measured in the penalty's own metric: the first task's Fisher (EWC) or path-integral
    importance (SI) weights each parameter's move during the second task."""
    moves = {}
    for name, net in (("naive", model()), ("held", model([method]))):
        first = train(net, TASKS[:1])[0]
        if name == "held":
            importance = copy.deepcopy(method.fishers[0] if isinstance(method, EWC) else method.omega)
        second = train(net, TASKS[1:])[0]
        moves[name] = {k: second[k] - first[k] for k in first}

    def weighted(move):
        return sum((importance[k].clamp(min=0) * move[k].pow(2)).sum() for k in importance).item()

    assert weighted(moves["held"]) < 0.01 * weighted(moves["naive"])


def test_a_moderate_penalty_reduces_forgetting_of_the_first_task():
    first = TASKS[0].dataset

    def accuracy(net):
        return (net(first.images).argmax(1) == first.labels).float().mean().item()

    naive, ewc, replay = model(), model([EWC(lambda_=50)]), model([Replay(budget_per_class=5)])
    for net in (naive, ewc, replay):
        train(net)
    assert accuracy(ewc) > accuracy(naive) and accuracy(replay) > accuracy(naive)


@pytest.mark.parametrize("labels", ["true", "predicted"])
def test_closed_form_fisher_equals_per_sample_gradients(labels):
    net = model()
    task = TASKS[0]
    fisher = diagonal_fisher(net, task, None, labels)
    x, y = task.dataset.images, task.dataset.labels
    if labels == "predicted":
        y = net(x).argmax(1)

    def log_likelihood(logits, y):
        return F.log_softmax(logits, dim=1).gather(1, y.view(-1, 1)).sum()

    reference = per_sample_gradient_magnitudes(net.backbone, trainable(net), x, y, log_likelihood, "square")
    for name in fisher:
        torch.testing.assert_close(fisher[name], reference[name] / len(y))


def test_online_ewc_keeps_one_decayed_fisher_at_the_latest_weights():
    method = OnlineEWC(lambda_=1, gamma=0.5)
    method.consolidate({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 2.0])})
    method.consolidate({"w": torch.ones(2)}, {"w": torch.tensor([4.0, 4.0])})
    assert len(method.fishers) == 1 and torch.equal(method.fishers[0]["w"], torch.tensor([4.5, 5.0]))
    assert torch.equal(method.anchors[0]["w"], torch.ones(2))
    ewc = EWC(lambda_=1)
    ewc.consolidate({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    ewc.consolidate({"w": torch.ones(2)}, {"w": torch.ones(2)})
    assert len(ewc.fishers) == 2  # one quadratic per task


def test_si_importance_is_the_path_integral_over_the_squared_change():
    net = model([SI(c=1, xi=0.1)])
    start = {k: v.detach().clone() for k, v in trainable(net).items()}
    train(net, TASKS[:1], steps=5)
    si = net.methods[0]
    end = trainable(net)
    for name, omega in si.omega.items():
        torch.testing.assert_close(omega, si.path[name] / ((end[name].detach() - start[name]).pow(2) + 0.1))
    assert sum(si.path[n].sum() for n in si.path) > 0  # descending the loss: W = -sum g * delta > 0


def test_lwf_distils_from_the_model_at_the_task_boundary():
    lwf = LwF(weight=1.0, temperature=2.0)
    net = model([lwf])
    train(net, TASKS[:1], steps=10)
    boundary = copy.deepcopy(net.backbone)
    lwf.start_task(net, TASKS[1])
    x = TASKS[1].dataset.images
    assert lwf.old_classes == [0, 1]
    assert lwf.loss(net, x, TASKS[1].dataset.labels, net(x)).item() == pytest.approx(0, abs=1e-6)  # same as teacher
    with torch.no_grad():
        net.backbone.fc3.bias += torch.tensor([3.0, -3.0, 0, 0])
    assert lwf.loss(net, x, TASKS[1].dataset.labels, net(x)).item() > 0.1
    assert torch.equal(lwf.teacher(net)(x), boundary(x))


def test_replay_memory_is_class_balanced_within_its_budget():
    per_class = Replay(budget_per_class=3)
    total = Replay(budget=8)
    for task in TASKS:
        per_class.end_task(None, task)
        total.end_task(None, task)
    assert torch.bincount(per_class.labels).tolist() == [3, 3, 3, 3]
    assert torch.bincount(total.labels).tolist() == [2, 2, 2, 2]  # 8 shared by the 4 classes seen
    reservoir = Replay(budget=10, selection="reservoir")
    for task in TASKS:
        reservoir.end_task(None, task)
    assert len(reservoir) == 10 and reservoir.seen == sum(len(t.dataset) for t in TASKS)
    memory = {tuple(x.tolist()) for x in reservoir.images}
    data = {tuple(x.tolist()) for t in TASKS for x in t.dataset.images}
    assert memory <= data


def test_replay_adds_the_loss_of_a_memory_batch_and_leaves_the_global_rng_alone():
    net = model()
    net.train()
    replay = Replay(budget_per_class=24, batch_size=96)  # the whole memory, each batch
    replay.end_task(net, TASKS[0])
    x, y = TASKS[1].dataset.images, TASKS[1].dataset.labels
    state = torch.get_rng_state()
    term = replay.loss(net, x, y, net(x))
    assert torch.equal(torch.get_rng_state(), state)
    memory_x, memory_y = TASKS[0].dataset.images, TASKS[0].dataset.labels
    assert term.item() == pytest.approx(F.cross_entropy(net(memory_x), memory_y).item(), rel=1e-5)


def test_task_incremental_logits_are_masked_to_each_samples_task():
    net = model(scenario="task", tasks=[[0, 1], [2, 3]])
    logits = torch.tensor([[0.0, 1.0, 9.0, 9.0], [9.0, 9.0, 1.0, 0.0]])
    masked = net.scenario_logits(logits, torch.tensor([0, 3]))
    assert masked.argmax(1).tolist() == [1, 2]
    assert torch.isinf(masked[0, 2:]).all() and torch.isinf(masked[1, :2]).all()
    assert torch.equal(model().scenario_logits(logits, torch.tensor([0, 3])), logits)  # class-incremental


@pytest.mark.parametrize("build, match", [
    (lambda: Replay(budget_per_class=-1), r"budget_per_class=-1.*>= 0"),
    (lambda: Replay(budget=-5, selection="reservoir"), r"budget=-5.*>= 0"),
    (lambda: Replay(budget_per_class=10, selection="fifo"), r"selection='fifo'.*class_balanced"),
    (lambda: Replay(budget_per_class=10, selection="reservoir"), "reservoir needs a total `budget`"),
    (lambda: EWC(lambda_=-1), r"lambda_=-1.*>= 0"),
    (lambda: OnlineEWC(gamma=1.5), r"gamma=1.5.*\[0, 1\]"),
    (lambda: SI(xi=0), r"xi=0.*> 0"),
    (lambda: LwF(temperature=0), r"temperature=0.*> 0"),
    (lambda: Classifier(scenario="domain"), r"scenario='domain'.*\['class', 'task'\]"),
    (lambda: model(scenario="task", tasks=[[0, 7]]).scenario_logits(torch.zeros(1, 4), torch.tensor([0])),
     r"\[7\] are outside the model's classes 0..3"),
], ids=["replay budget", "reservoir budget", "selection", "reservoir per class", "ewc lambda", "gamma", "xi",
        "temperature", "scenario", "task class"])
def test_bad_settings_fail_with_one_line(build, match):
    with pytest.raises(ValueError, match=match):
        build()
