"""Task-vector geometry on vectors whose answers are known: orthogonal, identical and opposite
vectors, a rank-1 update and the identity."""

import math

import pytest
import torch

from music.experiments.task_vector_report import write_analysis_section
from music.merging.checks import TaskVectorError
from music.task_vector import TaskVector
from music.task_vector_analysis import (analyse, cosine_matrix, effective_rank, effective_ranks, layer_norms,
                                        sign_conflict_rates)


def vector(weight, bias) -> TaskVector:
    return TaskVector({"fc.weight": torch.tensor(weight, dtype=torch.float32),
                       "fc.bias": torch.tensor(bias, dtype=torch.float32)})


def test_cosine_is_zero_for_orthogonal_vectors_and_one_for_identical_ones():
    a = vector([[1.0, 0.0], [0.0, 0.0]], [0.0, 2.0])
    b = vector([[0.0, 3.0], [0.0, 1.0]], [0.0, 0.0])  # no entry where both are nonzero
    cosine = cosine_matrix([a, b, a])
    assert cosine[0, 1] == pytest.approx(0.0, abs=1e-12) and cosine[0, 2] == pytest.approx(1.0)
    assert cosine[1, 1] == pytest.approx(1.0) and (cosine == cosine.T).all()
    assert cosine_matrix([a, -1 * a])[0, 1] == pytest.approx(-1.0)
    assert cosine[0, 1] == pytest.approx(a.cosine(b), abs=1e-12)  # agrees with TaskVector.cosine
    zero = vector([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    assert math.isnan(cosine_matrix([a, zero])[0, 1])  # a zero vector has no direction


def test_sign_conflicts_count_only_entries_where_two_vectors_are_nonzero():
    a = vector([[1.0, -2.0], [3.0, 0.5]], [1.0, -1.0])
    assert sign_conflict_rates([a, -a]) == {"fc.bias": 1.0, "fc.weight": 1.0}  # opposite: every entry conflicts
    assert sign_conflict_rates([a, 2 * a]) == {"fc.bias": 0.0, "fc.weight": 0.0}
    # weight: entries (0,0) agree, (0,1) conflict, (1,0) and (1,1) have one nonzero value: 1 of 2
    b = vector([[2.0, 1.0], [0.0, 0.0]], [0.0, 0.0])
    rates = sign_conflict_rates([a, b])
    assert rates["fc.weight"] == 0.5 and math.isnan(rates["fc.bias"])
    assert math.isnan(sign_conflict_rates([a])["fc.weight"])  # one vector cannot conflict


def test_effective_rank_of_rank_one_and_identity():
    u, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, -1.0, 0.5, 2.0])
    assert effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-6)
    for n in (1, 3, 8):
        assert effective_rank(torch.eye(n)) == pytest.approx(n)
    # two singular values 3 and 1: p = (3/4, 1/4), exp of the entropy
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert math.isnan(effective_rank(torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="2-D matrix"):
        effective_rank(torch.ones(3))
    assert set(effective_ranks([vector([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0])])) == {"fc.weight"}  # 2-D layers only


def test_norms_analysis_and_the_report_section(tmp_path):
    a, b = vector([[3.0, 0.0], [0.0, 4.0]], [0.0, 0.0]), vector([[0.0, 1.0], [0.0, 0.0]], [1.0, 0.0])
    assert layer_norms([a, b]) == {"fc.bias": [0.0, 1.0], "fc.weight": [5.0, 1.0]}
    analysis = analyse({"tau_a": a, "tau_b": b})
    assert analysis.layers == ("fc.bias", "fc.weight") and analysis.norms.tolist() == [[0.0, 5.0], [1.0, 1.0]]
    # singular values of diag(3, 4): 4 and 3, p = (4/7, 3/7)
    assert analysis.effective_rank["fc.weight"] == pytest.approx([math.exp(-(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7))), 1.0])
    section = write_analysis_section({"tau_a": a, "tau_b": b}, tmp_path, "geometry")
    assert section.startswith("## Task-vector geometry") and "### Cosine similarity of the task vectors" in section
    assert "| tau_a | 1.000 | 0.000 |" in section and "| fc.weight | 2×2 | – | 5.0000 | 1.0000 | 1.98 | 1.00 |" in section
    assert (tmp_path / "geometry.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "geometry_layers.csv").read_text().splitlines()[0].startswith("layer,shape,sign_conflict,norm_tau_a")
    with pytest.raises(TaskVectorError):
        cosine_matrix([a, TaskVector({"other": torch.zeros(2)})])
