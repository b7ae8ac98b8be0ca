"""The merge methods of later papers, each on its defining property over synthetic tensors:
TSV-M's and Iso-CTS's orthonormal subspaces, Iso-C's flat spectrum, the consensus mask,
Breadcrumbs' exact shares, Fisher and RegMean reducing to the average; the statistics they
read; every shipped recipe building its method; every bad setting a one-line error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from music.cli import main
from music.config import CONFIG_DIR
from music.fisher import per_sample_gradient_magnitudes
from music.merging import (TIES, TSVM, Breadcrumbs, Consensus, Fisher, IsoC, IsoCTS, MergeMethod, RegMean,
                           TaskVectorError, compute_statistics, load_statistics, save_statistics)
from music.merging.masks import breadcrumbs_mask, consensus_mask, tall_masks
from music.merging.spectral import iso_cts_factors, tsv_factors

torch.set_num_threads(1)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def taus(count: int = 3, shape: tuple[int, ...] = (12, 9)) -> list[torch.Tensor]:
    return [randn(*shape, seed=i) for i in range(count)]


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


# -- TSV-M, Iso-C, Iso-CTS -----------------------------------------------------------------------

def test_tsvm_rebuilds_each_layer_from_orthonormal_task_subspaces():
    vectors = taus()  # r = 9, T = 3: each task keeps its top 3 components
    u, s, vh = tsv_factors(vectors, 1 / 3)
    assert u.shape == (12, 9) and vh.shape == (9, 9)
    torch.testing.assert_close(u.T @ u, eye(9))
    torch.testing.assert_close(vh @ vh.T, eye(9))
    torch.testing.assert_close(s, torch.cat([torch.linalg.svdvals(t)[:3] for t in vectors]))
    merged = TSVM().merge("w", None, vectors, [1.0, 1.0, 1.0])
    torch.testing.assert_close(merged, (u * s) @ vh)


def test_tsvm_of_one_full_rank_task_is_that_task_and_biases_are_averaged():
    (tau,) = taus(1)
    torch.testing.assert_close(TSVM().merge("w", None, [tau], [1.0]), tau)
    biases = taus(3, (5,))
    torch.testing.assert_close(TSVM().merge("b", None, biases, [1.0, 2.0, 1.0]),
                               (biases[0] + 2 * biases[1] + biases[2]) / 3)


def test_iso_c_has_a_flat_spectrum_at_the_mean_singular_value_of_the_sum():
    vectors = taus()
    merged = IsoC().merge("w", None, vectors, [1.0, 1.0, 1.0])
    spectrum = torch.linalg.svdvals(merged)
    expected = torch.linalg.svdvals(sum(vectors)).mean()
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, float(expected)))
    # the singular directions are the sum's: the merge commutes with its left/right bases
    u, _, vh = torch.linalg.svd(sum(vectors), full_matrices=False)
    torch.testing.assert_close(merged, expected * u @ vh)


def test_iso_cts_subspaces_are_orthonormal_and_its_spectrum_flat():
    vectors = taus()
    u, s, vh = iso_cts_factors(vectors, 0.5)  # r = 9: 4 common directions would leave 5, rounded to 2 per task
    assert u.shape == (12, 9) and vh.shape == (9, 9) and torch.all(s == s[0])
    torch.testing.assert_close(u.T @ u, eye(9))
    torch.testing.assert_close(vh @ vh.T, eye(9))
    merged = IsoCTS(common_fraction=0.5).merge("w", None, vectors, [1.0, 1.0, 1.0])
    spectrum = torch.linalg.svdvals(merged)
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, float(s[0])))
    # all of the rank given to the common subspace: Iso-C
    torch.testing.assert_close(IsoCTS(common_fraction=1.0).merge("w", None, vectors, [1.0] * 3),
                               IsoC().merge("w", None, vectors, [1.0] * 3))


def test_iso_cts_task_directions_lie_outside_the_common_subspace():
    vectors = taus()
    common = torch.linalg.svd(sum(vectors), full_matrices=False)[0][:, :3]  # f = 1/3 of r = 9: 3 common
    u, _, _ = iso_cts_factors(vectors, 1 / 3)
    torch.testing.assert_close(common.T @ u[:, 3:], torch.zeros(3, 6, dtype=torch.float64), atol=1e-10, rtol=0)


# -- Consensus, Breadcrumbs ----------------------------------------------------------------------

def test_consensus_keeps_exactly_the_weights_at_least_k_tasks_mark():
    vectors = taus(4, (50, 20))
    weights = [1.0, 0.5, 1.0, 2.0]
    scaled = [t * w for t, w in zip(vectors, weights)]
    multi = sum(scaled)
    for k in (0, 1, 2, 3, 4):
        merged = Consensus(min_tasks=k, mask_lambda=0.6).merge("w", None, vectors, weights)
        marks = sum((t.abs() >= 0.6 * (multi - t).abs()).long() for t in scaled)  # counted by hand
        assert torch.equal(merged != 0, (marks >= k) & (multi != 0))
        assert torch.equal(merged[marks >= k], multi[marks >= k])
        assert torch.equal(consensus_mask(tall_masks(scaled, multi, [0.6] * 4), k), marks >= k)
    assert 0 < int((consensus_mask(tall_masks(scaled, multi, [0.6] * 4), 2)).sum()) < multi.numel()


def test_consensus_with_fewer_entries_than_k_keeps_what_every_task_marks():
    t1, t2 = torch.tensor([1.0, 0.1, -1.0]), torch.tensor([1.0, -0.1, 0.2])
    one = Consensus(min_tasks=2, mask_lambda=1.0).merge("w", None, [t1], [1.0])  # τ_MTL = τ1: all marked
    assert torch.equal(one, t1)
    three = Consensus(min_tasks=3, mask_lambda=1.0).merge("w", None, [t1, t2], [1.0, 1.0])
    assert torch.equal(three, Consensus(min_tasks=2, mask_lambda=1.0).merge("w", None, [t1, t2], [1.0, 1.0]))


def test_consensus_hand_computed_and_over_ties():
    t1, t2 = torch.tensor([1.0, 0.1, -1.0]), torch.tensor([1.0, -0.1, 0.2])
    # τ_MTL = [2, 0, −0.8]; |τ1| ≥ |τ_MTL − τ1|: [1 ≥ 1, .1 ≥ .1, 1 ≥ .2]; τ2: [1 ≥ 1, .1 ≥ .1, .2 ≥ 1 no]
    merged = Consensus(min_tasks=2, mask_lambda=1.0).merge("w", None, [t1, t2], [1.0, 1.0])
    assert torch.equal(merged, torch.tensor([2.0, 0.0, 0.0]))
    # over TIES (density 1): τ_MTL = [1, 0, −1]; τ2's last entry is the only one unmarked
    ties = TIES(density=1.0, scope="per_tensor")
    assert torch.equal(ties.merge("w", None, [t1, t2], [1.0, 1.0]), torch.tensor([1.0, 0.0, -1.0]))
    over_ties = Consensus(min_tasks=2, mask_lambda=1.0, combine=ties).merge("w", None, [t1, t2], [1.0, 1.0])
    assert torch.equal(over_ties, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("beta, gamma", [(0.1, 0.5), (0.01, 0.85), (0.0, 0.0), (0.25, 0.0)])
def test_breadcrumbs_masks_exactly_the_intended_shares(beta, gamma):
    t = randn(40, 25, seed=3)
    keep = breadcrumbs_mask(t, beta, gamma)
    n = t.numel()
    assert int(keep.sum()) == n - round(beta * n) - round(gamma * n)
    magnitudes = t.abs()
    dropped = magnitudes[~keep]
    large, small = dropped[dropped > magnitudes[keep].max()], dropped[dropped < magnitudes[keep].min()]
    assert len(large) == round(beta * n) and len(small) == round(gamma * n)


def test_breadcrumbs_adds_the_masked_weighted_vectors_and_counts_ties_exactly():
    vectors = taus(2, (10, 10))
    merged = Breadcrumbs(beta=0.1, gamma=0.3).merge("w", None, vectors, [1.0, -2.0])
    expected = sum(torch.where(breadcrumbs_mask(t, 0.1, 0.3), t * w, 0) for t, w in zip(vectors, [1.0, -2.0]))
    assert torch.equal(merged, expected)
    flat = torch.ones(10, dtype=torch.float64)  # every magnitude tied: still exactly 1 + 3 dropped
    assert int(breadcrumbs_mask(flat, 0.1, 0.3).sum()) == 6


# -- Fisher, RegMean -----------------------------------------------------------------------------

def test_fisher_with_equal_fishers_is_the_average_and_weights_scale_the_fishers():
    vectors = taus()
    fisher = Fisher()
    same = torch.rand(12, 9, generator=torch.Generator().manual_seed(0)) + 0.1
    fisher.provide([{"fisher/w": same} for _ in vectors])
    torch.testing.assert_close(fisher.merge("w", None, vectors, [1.0] * 3), sum(vectors) / 3)
    torch.testing.assert_close(fisher.merge("w", None, vectors, [1.0, 2.0, 1.0]),
                               (vectors[0] + 2 * vectors[1] + vectors[2]) / 4)
    # one model's Fisher dominating: its parameters win; zero Fishers: the floor gives the mean
    fisher.provide([{"fisher/w": same * 1e6}, {"fisher/w": same}, {"fisher/w": torch.zeros(12, 9)}])
    merged = fisher.merge("w", None, vectors, [1.0] * 3)
    torch.testing.assert_close(merged, vectors[0], atol=1e-4, rtol=1e-4)
    fisher.provide([{"fisher/w": torch.zeros(12, 9)} for _ in vectors])
    torch.testing.assert_close(fisher.merge("w", None, vectors, [1.0] * 3), sum(vectors) / 3)


def test_fisher_averages_tensors_without_fishers_and_refuses_partial_ones():
    fisher = Fisher()
    fisher.provide([{"fisher/w": torch.ones(2)}, {"fisher/w": torch.ones(2)}])
    buffers = taus(2, (4,))
    torch.testing.assert_close(fisher.merge("running_mean", None, buffers, [1.0, 1.0]), sum(buffers) / 2)
    fisher.provide([{"fisher/w": torch.ones(2)}, {"fisher/v": torch.ones(2)}])
    with pytest.raises(TaskVectorError, match=r"entries \[1\] have no 'fisher' statistics for 'w'"):
        fisher.merge("w", None, taus(2, (2,)), [1.0, 1.0])


def gram(seed: int, n: int = 9) -> torch.Tensor:
    x = randn(40, n, seed=100 + seed)
    return x.T @ x / 40


def test_regmean_of_one_model_is_it_and_with_identical_grams_the_average():
    vectors = taus()
    one = RegMean()
    one.provide([{"gram/w": gram(0)}])
    torch.testing.assert_close(one.merge("w", None, vectors[:1], [1.0]), vectors[0])
    same = RegMean(alpha=0.5)
    same.provide([{"gram/w": gram(0)} for _ in vectors])
    torch.testing.assert_close(same.merge("w", None, vectors, [1.0] * 3), sum(vectors) / 3)
    biases = taus(3, (12,))
    torch.testing.assert_close(same.merge("b", None, biases, [1.0] * 3), sum(biases) / 3)


def test_regmean_solves_the_regression_on_every_models_inputs():
    """With α = 1, W minimises Σ_i ||X_i Wᵀ − X_i W_iᵀ||²: the gradient Σ_i (W − W_i) G_i is 0."""
    vectors = taus()
    method = RegMean(alpha=1.0)
    grams = [gram(i) for i in range(3)]
    method.provide([{"gram/w": g} for g in grams])
    merged = method.merge("w", None, vectors, [1.0] * 3)
    residual = sum((merged - t) @ g for t, g in zip(vectors, grams))
    torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-10, rtol=0)
    assert not torch.allclose(merged, sum(vectors) / 3)


def test_regmean_gives_inputs_no_model_sees_the_average():
    vectors = taus(2, (4, 3))
    grams = [gram(i, 3) for i in range(2)]
    for g in grams:
        g[2, :], g[:, 2] = 0, 0  # input 2 is zero in every model's data (a border pixel)
    method = RegMean()
    method.provide([{"gram/w": g} for g in grams])
    merged = method.merge("w", None, vectors, [1.0, 1.0])
    torch.testing.assert_close(merged[:, 2], (vectors[0][:, 2] + vectors[1][:, 2]) / 2)
    assert torch.isfinite(merged).all()


def test_statistics_methods_refuse_merging_without_statistics_and_nonpositive_weights():
    with pytest.raises(TaskVectorError, match="needs each entry's 'gram' statistics"):
        RegMean().merge("w", None, taus(1), [1.0])
    fisher = Fisher()
    fisher.provide([{"fisher/w": torch.ones(12, 9)}] * 2)
    with pytest.raises(TaskVectorError, match=r"Fisher weights \[-1.0\] are not allowed"):
        fisher.merge("w", None, taus(2), [1.0, -1.0])


# -- statistics ----------------------------------------------------------------------------------

def loader() -> DataLoader:
    x = randn(30, 6, seed=7).float()
    y = torch.arange(30) % 3
    return DataLoader(TensorDataset(x, y), batch_size=8)


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_statistics_are_the_input_grams_and_the_per_sample_fisher(tmp_path):
    net = network()
    stats = compute_statistics(net, loader(), {"fisher", "gram"}, labels="true")
    x = torch.cat([b[0] for b in loader()])
    y = torch.cat([b[1] for b in loader()])
    torch.testing.assert_close(stats["gram/0.weight"], x.T @ x / 30)
    hidden = torch.relu(net[0](x)).detach()
    torch.testing.assert_close(stats["gram/2.weight"], hidden.T @ hidden / 30)
    reference = per_sample_gradient_magnitudes(net, dict(net.named_parameters()), x, y)
    for name, square in reference.items():
        torch.testing.assert_close(stats[f"fisher/{name}"], square / 30)
    save_statistics(tmp_path / "s.safetensors", stats)
    loaded = load_statistics(tmp_path / "s.safetensors")
    assert loaded.keys() == stats.keys() and all(torch.equal(loaded[k], stats[k]) for k in stats)
    assert set(compute_statistics(net, loader(), {"gram"})) == {"gram/0.weight", "gram/2.weight"}


def expected_fisher_by_hand(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_c p(c | x) (∇ log p(c | x))², one backward pass per sample and class, averaged."""
    out = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    for sample in x:
        log_p = torch.log_softmax(net(sample.unsqueeze(0))[0], dim=0)
        for c in range(len(log_p)):
            grads = torch.autograd.grad(log_p[c], list(net.parameters()), retain_graph=True)
            for (name, _), g in zip(net.named_parameters(), grads):
                out[name] += log_p[c].exp().detach() * g.pow(2)
    return {name: f / len(x) for name, f in out.items()}


@pytest.mark.parametrize("normed", [False, True])  # True: a LayerNorm, so no closed form (vmap of grad)
def test_the_default_fisher_is_the_expectation_over_the_models_labels(normed):
    net = network()
    if normed:
        net = nn.Sequential(net[0], nn.LayerNorm(5), nn.ReLU(), net[2])
    stats = compute_statistics(net, loader(), {"fisher"})
    reference = expected_fisher_by_hand(net, torch.cat([b[0] for b in loader()]))
    assert set(stats) == {f"fisher/{name}" for name in reference}
    for name, f in reference.items():
        torch.testing.assert_close(stats[f"fisher/{name}"], f)


def test_bad_statistics_are_one_line_errors(tmp_path):
    with pytest.raises(TaskVectorError, match=r"statistics kinds \['hessian'\] are not allowed"):
        compute_statistics(network(), loader(), {"hessian"})
    with pytest.raises(TaskVectorError, match=r"labels='sampled' is not allowed: choose 'expected', 'predicted' or 'true'"):
        compute_statistics(network(), loader(), {"fisher"}, labels="sampled")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(TaskVectorError, match=r"^statistics file .*junk.safetensors' cannot be read: [^\n]*$"):
        load_statistics(tmp_path / "junk.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TaskVectorError, match=r"hold keys \['w'\] that are not '<kind>/<key>'"):
        load_statistics(tmp_path / "model.safetensors")


# -- recipes -------------------------------------------------------------------------------------

def write(path: Path, state: dict) -> str:
    save_file(state, str(path))
    return str(path)


@pytest.fixture
def models(tmp_path):
    """A base and two fine-tuned linear layers, each with its Fisher and Gram statistics."""
    base = {"l.weight": torch.zeros(2, 3), "l.bias": torch.zeros(2)}
    files = {"base": write(tmp_path / "base.safetensors", base), "dir": tmp_path}
    for i, scale in ((1, 1.0), (2, -3.0)):
        files[f"ft{i}"] = write(tmp_path / f"ft{i}.safetensors",
                                {"l.weight": scale * torch.arange(6.0).reshape(2, 3), "l.bias": torch.full((2,), scale)})
        files[f"stats{i}"] = str(tmp_path / f"stats{i}.safetensors")
        save_statistics(files[f"stats{i}"], {"fisher/l.weight": torch.full((2, 3), float(i)),
                                             "fisher/l.bias": torch.full((2,), float(i)), "gram/l.weight": torch.eye(3)})
    return files


def run_recipe(models, method: dict, statistics: bool = True) -> dict:
    entries = [{"path": models[f"ft{i}"]} | ({"statistics": models[f"stats{i}"]} if statistics else {}) for i in (1, 2)]
    recipe = models["dir"] / "recipe.yaml"
    out = models["dir"] / "out.safetensors"
    recipe.write_text(yaml.safe_dump({"base": models["base"], "output": str(out), "models": entries,
                                      "method": method, "overwrite": True}))
    main(["merge", "--config", str(recipe)])
    return load_file(str(out))


def test_a_recipe_gives_each_entry_its_statistics_file(models):
    out = run_recipe(models, {"class_path": "music.merging.Fisher"})
    # Fishers 1 and 2: (1·τ1 + 2·τ2) / 3 = (1 − 6)/3 · arange
    torch.testing.assert_close(out["l.weight"], -5 / 3 * torch.arange(6.0).reshape(2, 3))
    torch.testing.assert_close(out["l.bias"], torch.full((2,), -5 / 3))
    out = run_recipe(models, {"class_path": "music.merging.RegMean"})
    torch.testing.assert_close(out["l.weight"], -1.0 * torch.arange(6.0).reshape(2, 3))  # identical Grams: the mean


def test_a_recipe_without_statistics_for_a_method_that_needs_them_is_one_line(models, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_recipe(models, {"class_path": "music.merging.RegMean"}, statistics=False)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"^error: models\[0\], models\[1\] without `statistics` is not allowed with method RegMean"
                    r"\(alpha=0.9\)", err) and "\n" not in err


CLASSES = {"tsvm": "TSVM", "iso_c": "IsoC", "iso_cts": "IsoCTS", "consensus": "Consensus", "breadcrumbs": "Breadcrumbs",
           "fisher": "Fisher", "regmean": "RegMean"}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_shipped_recipe_builds_its_method(name):
    recipe = yaml.safe_load((CONFIG_DIR / "merge" / f"addition_{name}.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=MergeMethod)
    method = parser.instantiate(parser.parse_object({"method": recipe["method"]})).method
    assert type(method).__name__ == CLASSES[name]
    method.check_entries(len(recipe["models"]))
    assert all(("statistics" in m) == bool(method.needs) for m in recipe["models"])


@pytest.mark.parametrize("method, message", [
    ({"class_path": "music.merging.TSVM", "init_args": {"rank_fraction": 0.0}}, r"TSVM rank_fraction=0.0 is not allowed: it must be in \(0, 1\]"),
    ({"class_path": "music.merging.IsoCTS", "init_args": {"common_fraction": 1.5}}, r"IsoCTS common_fraction=1.5 is not allowed: it must be in \(0, 1\]"),
    ({"class_path": "music.merging.Consensus", "init_args": {"min_tasks": -1}}, r"Consensus min_tasks=-1 is not allowed: it must be an integer >= 0"),
    ({"class_path": "music.merging.Consensus", "init_args": {"mask_lambda": 0.0}}, r"Consensus mask_lambda=0.0 is not allowed: it must be > 0"),
    ({"class_path": "music.merging.Consensus", "init_args": {"mask_lambda": [0.4]}}, r"Consensus mask_lambda=\[0.4\] gives 1 values for 2 entries"),
    ({"class_path": "music.merging.Consensus", "init_args": {"combine": {"class_path": "music.merging.Fisher"}}},
     r"Consensus combine=Fisher\(floor=1e-06\) is not allowed: give a MergeMethod that needs no statistics"),
    ({"class_path": "music.merging.Breadcrumbs", "init_args": {"beta": 1.0}}, r"Breadcrumbs beta=1.0 is not allowed: it must be in \[0, 1\)"),
    ({"class_path": "music.merging.Breadcrumbs", "init_args": {"gamma": -0.1}}, r"Breadcrumbs gamma=-0.1 is not allowed: it must be in \[0, 1\)"),
    ({"class_path": "music.merging.Breadcrumbs", "init_args": {"beta": 0.5, "gamma": 0.5}}, r"Breadcrumbs beta=0.5 with gamma=0.5 is not allowed: beta \+ gamma must be < 1"),
    ({"class_path": "music.merging.Fisher", "init_args": {"floor": 0.0}}, r"Fisher floor=0.0 is not allowed: it must be > 0"),
    ({"class_path": "music.merging.RegMean", "init_args": {"alpha": 1.5}}, r"RegMean alpha=1.5 is not allowed: it must be in \[0, 1\]"),
])
def test_bad_method_settings_give_one_line_errors(models, capsys, method, message):
    with pytest.raises(SystemExit) as exit_:
        run_recipe(models, method)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
