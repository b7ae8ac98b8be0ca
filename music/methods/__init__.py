"""Continual-learning methods as configuration: each a small object the ``Classifier`` takes in
``model.methods``, so any phase list can use them and a shipped config delta switches one on
(``music fit --config split_mnist --config ewc``).

A method keeps state across tasks: the schedule tells the model when each phase starts, the
model passes it on, and ``Method.on_phase_start`` turns a change of training split into
``end_task`` / ``start_task``. It adds a term to every batch's loss (``loss``), may reshape the
batch's own cross-entropy (``batch_logits``) and may edit each step's gradients
(``on_before_optimizer_step``). None is a second training loop: they run inside the model's
own steps, blocks of batches included.
"""

from music.methods.agem import AGEM
from music.methods.base import Method, Model, Task
from music.methods.derpp import DERPP
from music.methods.er_ace import ERACE
from music.methods.ewc import EWC, OnlineEWC
from music.methods.lwf import LwF
from music.methods.mas import MAS
from music.methods.memory import Rehearsal
from music.methods.replay import Replay
from music.methods.si import SI

__all__ = ["AGEM", "DERPP", "ERACE", "EWC", "LwF", "MAS", "Method", "Model", "OnlineEWC", "Rehearsal", "Replay", "SI",
           "Task"]
