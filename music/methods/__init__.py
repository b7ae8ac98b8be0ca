"""Continual-learning methods as configuration: each a small object the ``Classifier`` takes in
``model.methods``, so any phase list can use them and a shipped config delta switches one on
(``music fit --config split_mnist --config ewc``).

A method keeps state across tasks: the schedule tells the model when each phase starts, the
model passes it on, and ``Method.on_phase_start`` turns a change of training split into
``end_task`` / ``start_task``. It adds a term to every batch's loss (``loss``). None is a second
training loop: they run inside the model's own steps, blocks of batches included.
"""

from music.methods.base import Method, Model, Task
from music.methods.ewc import EWC, OnlineEWC
from music.methods.lwf import LwF
from music.methods.replay import Replay
from music.methods.si import SI

__all__ = ["EWC", "LwF", "Method", "Model", "OnlineEWC", "Replay", "SI", "Task"]
