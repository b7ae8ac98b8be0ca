"""``music merge``: each method on hand-computed tensors through the recipe path, exactness,
streamed == in-memory bytes, λ chosen without the test set, and every bad recipe's one-line error."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from music.cli import main
from music.merge import Evaluation, Evaluator, Merge, SelectionError, Source
from music.task_vector import TaskVector, dare, fingerprint


def write(path, state) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """base, two fine-tuned models with hand-chosen differences, an int buffer and a head."""
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "head": torch.tensor([0.5, -0.5]), "steps": torch.tensor(7)}
    ft1 = {"w": torch.tensor([[1.5, 2.0], [2.0, 4.25]]), "head": torch.tensor([1.0, -0.5]), "steps": torch.tensor(9)}
    ft2 = {"w": torch.tensor([[0.5, 2.5], [3.5, 4.0]]), "head": torch.tensor([0.5, 0.5]), "steps": torch.tensor(9)}
    return {name: write(tmp_path / f"{name}.safetensors", sd) for name, sd in
            (("base", base), ("ft1", ft1), ("ft2", ft2))} | {"dir": tmp_path}


def merge(files, out="out.safetensors", **recipe) -> tuple[dict, dict]:
    result = Merge(base=files["base"], output=str(files["dir"] / out), **recipe).run()
    return load_file(str(files["dir"] / out)), result


def models(files, *entries) -> list[Source]:
    return [Source(path=files[name], **kw) for name, kw in entries]


# τ1 = [[.5, 0], [-1, .25]], head [.5, 0];  τ2 = [[-.5, .5], [.5, 0]], head [0, 1]

def test_task_arithmetic_hand_computed(files):
    out, result = merge(files, models=models(files, ("ft1", {"weight": 1.0}), ("ft2", {"weight": -0.5})), lambda_=0.5)
    # w + 0.5 * (τ1 - 0.5 τ2) = w + 0.5 * [[.75, -.25], [-1.25, .25]]
    assert torch.equal(out["w"], torch.tensor([[1.375, 1.875], [2.375, 4.125]]))
    assert torch.equal(out["head"], torch.tensor([0.75, -0.75]))
    assert torch.equal(out["steps"], torch.tensor(7))  # integer buffers are the base's
    assert result["report"]["applied"] == ["head", "w"] and result["report"]["skipped"] == ["steps"]


def test_ties_hand_computed(files):
    out, _ = merge(files, models=models(files, ("ft1", {}), ("ft2", {})), method="ties", density=0.5,
                   scope="per_tensor")
    # per tensor, keep the 2 largest |τ| of 4 in w (ties with the 2nd are kept), 1 of 2 in head:
    # τ1 w -> [[.5, 0], [-1, 0]], τ2 w -> [[-.5, .5], [.5, 0]]; signs: [[0?, +], [-, 0]]
    # (0,0): .5 - .5 = 0 -> 0; (0,1): only τ2 .5; (1,0): sum -.5 -> mean of agreeing (-1) = -1
    assert torch.equal(out["w"], torch.tensor([[1.0, 2.5], [2.0, 4.0]]))
    # head: τ1 -> [.5, 0], τ2 -> [0, 1]: disjoint, each kept alone
    assert torch.equal(out["head"], torch.tensor([1.0, 0.5]))


def test_dare_linear_equals_the_library_with_seed_per_entry(files):
    out, _ = merge(files, models=models(files, ("ft1", {"drop_rate": 0.5}), ("ft2", {"weight": 2.0})),
                   method="dare_linear", drop_rate=0.25, seed=3)
    base, ft1, ft2 = (load_file(files[n]) for n in ("base", "ft1", "ft2"))
    t1 = TaskVector.from_state_dicts(base, ft1, dtype=torch.float64)
    t2 = TaskVector.from_state_dicts(base, ft2, dtype=torch.float64)
    expected = (dare(t1, drop_rate=0.5, seed=3) + dare(t2, drop_rate=0.25, seed=4) * 2.0).apply_to(base)
    for key in ("w", "head"):
        assert torch.equal(out[key], expected[key])
    # hand check on one coordinate: survivors are scaled by 1 / (1 - p)
    kept = dare(TaskVector({"w": torch.ones(2, 2, dtype=torch.float64)}), drop_rate=0.5, seed=3).tensors["w"]
    assert set(kept.flatten().tolist()) <= {0.0, 2.0}


def test_dare_ties_is_dare_then_ties_and_same_seed_same_output(files):
    recipe = dict(models=models(files, ("ft1", {}), ("ft2", {})), method="dare_ties", drop_rate=0.5, seed=1)
    first, _ = merge(files, "a.safetensors", **recipe)
    again, _ = merge(files, "b.safetensors", **recipe)
    assert (files["dir"] / "a.safetensors").read_bytes() == (files["dir"] / "b.safetensors").read_bytes()
    base, ft1, ft2 = (load_file(files[n]) for n in ("base", "ft1", "ft2"))
    from music.task_vector import ties_merge
    taus = [dare(TaskVector.from_state_dicts(base, ft, dtype=torch.float64), drop_rate=0.5, seed=1 + i)
            for i, ft in enumerate((ft1, ft2))]
    expected = ties_merge(taus, density=1.0).apply_to(base)
    assert all(torch.equal(first[k], expected[k]) for k in ("w", "head"))


def test_one_model_weight_one_reproduces_it_exactly_on_random_float32(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {f"l{i}": torch.randn(64, 33, generator=gen) for i in range(3)}
    ft = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    files = {"base": write(tmp_path / "base.safetensors", base), "ft": write(tmp_path / "ft.safetensors", ft),
             "dir": tmp_path}
    out, _ = merge(files, models=[Source(files["ft"])])
    assert all(torch.equal(out[k], ft[k]) for k in ft)


def test_weight_minus_one_then_plus_one_returns_the_base(files):
    out, _ = merge(files, models=models(files, ("ft1", {"weight": -1.0}), ("ft1", {"weight": 1.0})))
    base = load_file(files["base"])
    assert all(torch.equal(out[k], base[k]) for k in base)


@pytest.mark.parametrize("recipe", [
    dict(method="task_arithmetic", lambda_=0.3),
    dict(method="ties", scope="per_tensor", density=0.5),
    dict(method="dare_linear", drop_rate=0.3, seed=5),
    dict(method="dare_ties", scope="per_tensor", density=0.7),
    dict(method="task_arithmetic", exclude=["head"], dtype="bfloat16"),
])
def test_streamed_and_in_memory_outputs_are_byte_identical(files, recipe):
    TaskVector.from_checkpoints(files["base"], files["ft2"]).save(files["dir"] / "tau2.safetensors")
    entries = dict(models=models(files, ("ft1", {"weight": 0.7})),
                   vectors=[Source(str(files["dir"] / "tau2.safetensors"), weight=-0.4)])
    _, memory = merge(files, "memory.safetensors", **entries, **recipe)
    _, streamed = merge(files, "streamed.safetensors", **entries, **recipe, stream=True)
    assert (files["dir"] / "memory.safetensors").read_bytes() == (files["dir"] / "streamed.safetensors").read_bytes()
    assert memory["report"] == streamed["report"] and memory["base_fingerprint"] == streamed["base_fingerprint"]
    assert [s.get("fingerprint") for s in memory["sources"]] == [s.get("fingerprint") for s in streamed["sources"]]


def test_key_filters_leave_the_head_unedited(files):
    out, result = merge(files, models=models(files, ("ft1", {})), exclude=["head"])
    assert torch.equal(out["head"], load_file(files["base"])["head"])
    assert torch.equal(out["w"], load_file(files["ft1"])["w"])
    assert result["report"]["applied"] == ["w"] and "head" in result["report"]["skipped"]


def test_provenance_beside_the_output(files):
    TaskVector.from_checkpoints(files["ft1"], files["ft2"]).save(files["dir"] / "other.safetensors")
    _, result = merge(files, "edited.safetensors", vectors=[Source(str(files["dir"] / "other.safetensors"))])
    recipe = yaml.safe_load((files["dir"] / "edited.recipe.yaml").read_text())
    report = json.loads((files["dir"] / "edited.report.json").read_text())
    assert recipe["vectors"][0]["path"].endswith("other.safetensors") and recipe["chosen_lambda"] == 1.0
    assert report["base_fingerprint"] == fingerprint(load_file(files["base"]))
    assert report["sources"][0]["base_matches"] is False and "other weights" in report["note"]
    assert "other weights than the base" in (files["dir"] / "edited.md").read_text()


def test_model_with_its_own_base_transfers_its_vector(files):
    """τ = θ(ft2) − θ(ft1) added to the base: the transfer recipe."""
    out, result = merge(files, models=[Source(files["ft2"], base=files["ft1"])])
    base, ft1, ft2 = (load_file(files[n]) for n in ("base", "ft1", "ft2"))
    assert torch.equal(out["w"], base["w"] + (ft2["w"] - ft1["w"]))
    assert result["sources"][0]["base_matches"] is False


# -- λ selection ------------------------------------------------------------------------------

class FakeEvaluator(Evaluator):
    """Scores a state by how close ``w`` is to a target, on 'val' and 'test' targets that
    disagree, and logs every split it is asked for (the real network is tested on MNIST)."""

    def __init__(self, target_val, target_test) -> None:
        self.targets = {"val": target_val, "test": target_test}
        self.log, self._selecting, self.split = [], False, "val"

    def evaluate(self, state, split):
        if self._selecting and split != self.split:
            raise SelectionError(split)
        self.log.append((split, self._selecting))
        acc = 1 / (1 + float((state["w"] - self.targets[split]).abs().sum()))
        return {"acc": acc, "loss": 1 - acc, "per_class": [acc, acc], "confusion": []}


def test_lambda_is_chosen_on_val_and_never_on_test(files, monkeypatch):
    base, ft1 = load_file(files["base"]), load_file(files["ft1"])
    val_target = base["w"] + 0.25 * (ft1["w"] - base["w"])  # best λ on val: 0.25; on test: 1
    monkeypatch.setattr("music.merge.Evaluator", lambda evaluation: FakeEvaluator(val_target, ft1["w"]))
    recipe = Merge(base=files["base"], output=str(files["dir"] / "o.safetensors"), models=models(files, ("ft1", {})),
                   lambda_=[0.0, 0.25, 0.5, 1.0], evaluate=Evaluation())
    result = recipe.run()
    assert result["lambda"] == 0.25
    log = recipe.evaluator.log
    assert [s for s, selecting in log if selecting] == ["val"] * 4 and ("test", True) not in log
    curve = {(r["split"], r["lambda"]): r for r in result["curve"]}
    assert max(curve["test", x]["acc"] for x in (0.0, 0.25, 0.5, 1.0)) == curve["test", 1.0]["acc"]
    assert (files["dir"] / "o.lambda.csv").read_text().count("\n") == 1 + 8
    assert (files["dir"] / "o.lambda.png").read_bytes()[:4] == b"\x89PNG"


# -- bad recipes: one line, naming the entry and what is allowed -----------------------------

def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", *map(str, args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def recipe_file(files, **recipe) -> str:
    path = files["dir"] / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": files["base"], "output": str(files["dir"] / "o.safetensors"),
                                    "models": [{"path": files["ft1"]}]} | recipe))
    return str(path)


@pytest.mark.parametrize("recipe, message", [
    ({"method": "slerp"}, r"method.*Expected a typing.Literal\['task_arithmetic', 'ties', 'dare_linear', 'dare_ties'\]"),
    ({"models": [{"path": "FT1", "weight": math.inf}]}, r"models\[0\].weight=inf is not allowed: it must be a finite number"),
    ({"models": [{"path": "FT1", "density": 0.0}]}, r"models\[0\].density=0.0 is not allowed: it must be in \(0, 1\]"),
    ({"models": [{"path": "FT1"}, {"path": "FT1", "density": 1.5}]}, r"models\[1\].density=1.5 .* in \(0, 1\]"),
    ({"models": [{"path": "FT1", "drop_rate": 1.0}]}, r"models\[0\].drop_rate=1.0 .* in \[0, 1\)"),
    ({"lambda_": []}, r"lambda_=\[\] is not allowed"),
    ({"lambda_": [0.0, 1.0]}, r"lambda_=\[0.0, 1.0\] is a grid but the recipe has no `evaluate`"),
    ({"lambda_": [0.0, 1.0], "evaluate": {"select_on": "test"}}, r"evaluate.select_on='test' is not allowed"),
    ({"models": []}, r"no models and no vectors"),
    ({"output": "o.pt"}, r"output='o.pt' is not allowed: .* .safetensors"),
    ({"stream": True, "method": "ties", "density": 0.5}, r"stream: true with method 'ties' needs scope: per_tensor"),
])
def test_bad_recipes_give_one_line_errors(files, capsys, recipe, message):
    if "models" in recipe:
        recipe["models"] = [m | {"path": files["ft1"]} for m in recipe["models"]]
    err = cli_error(capsys, "--config", recipe_file(files, **recipe))
    assert re.search(message, err), err


def test_models_of_different_architectures_list_keys_and_both_shapes(files, capsys):
    write(files["dir"] / "wide.safetensors", {"w": torch.zeros(2, 3), "head": torch.zeros(2), "steps": torch.tensor(0)})
    err = cli_error(capsys, "--config", recipe_file(files, models=[{"path": str(files["dir"] / "wide.safetensors")}]))
    assert "models[0]" in err and "w (2, 2) vs (2, 3)" in err
    for stream in (False, True):
        TaskVector({"w": torch.zeros(2, 3)}).save(files["dir"] / "v.safetensors")
        err = cli_error(capsys, "--config", recipe_file(files, vectors=[{"path": str(files["dir"] / "v.safetensors")}],
                                                        stream=stream, overwrite=True))
        assert "vectors[0]" in err and "does not fit the base" in err and "w (2, 3) vs (2, 2)" in err
        TaskVector({"w": torch.zeros(2, 2)}).save(files["dir"] / "v.safetensors")  # no head
        err = cli_error(capsys, "--config", recipe_file(files, vectors=[{"path": str(files["dir"] / "v.safetensors")}],
                                                        stream=stream, overwrite=True))
        assert "vectors[0] is another architecture than models[0]: keys missing from vectors[0]: head" in err


def test_an_existing_output_is_refused_unless_overwrite_and_no_partial_file_is_left(files, capsys, monkeypatch):
    out = files["dir"] / "o.safetensors"
    out.write_bytes(b"precious")
    err = cli_error(capsys, "--config", recipe_file(files))
    assert "exists" in err and "overwrite" in err and out.read_bytes() == b"precious"
    import music.task_vector as tv

    monkeypatch.setattr(tv, "_raw", lambda t: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        main(["merge", "--config", recipe_file(files), "--overwrite", "true"])
    assert out.read_bytes() == b"precious"  # the old file survives a failed write
    assert sorted(p.name for p in files["dir"].iterdir() if p.name.startswith("o.")) == ["o.safetensors"]
    monkeypatch.undo()
    main(["merge", "--config", recipe_file(files), "--overwrite", "true"])
    assert torch.equal(load_file(str(out))["w"], load_file(files["ft1"])["w"])


def test_a_vector_from_another_base_is_applied_and_reported(files):
    TaskVector.from_checkpoints(files["ft1"], files["ft2"]).save(files["dir"] / "v.safetensors")
    _, result = merge(files, vectors=[Source(str(files["dir"] / "v.safetensors"))], stream=True)
    assert result["sources"][0]["base_matches"] is False


def test_stream_refuses_torch_files_and_grids(files, tmp_path):
    torch.save(load_file(files["ft1"]), tmp_path / "ft1.pt")
    with pytest.raises(ValueError, match=r"models\[0\].path=.*ft1.pt.* stream: true"):
        Merge(base=files["base"], output=str(tmp_path / "x.safetensors"), models=[Source(str(tmp_path / "ft1.pt"))],
              stream=True)
    with pytest.raises(ValueError, match="stream: true takes one lambda_"):
        Merge(base=files["base"], output=str(tmp_path / "x.safetensors"), models=[Source(files["ft1"])],
              lambda_=[0.0, 1.0], evaluate=Evaluation(), stream=True)


def test_torch_checkpoints_are_read_safely(files, tmp_path):
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in load_file(files["ft1"]).items()}}, tmp_path / "ft1.ckpt")
    out, _ = merge(files, models=[Source(str(tmp_path / "ft1.ckpt"))])
    assert torch.equal(out["w"], load_file(files["ft1"])["w"])
