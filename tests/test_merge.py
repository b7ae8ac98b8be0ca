"""``music merge``: each method on hand-computed tensors through the recipe path, exactness,
streamed == in-memory bytes, λ chosen without the test set, a new method added as one class,
non-finite edits refused, and every bad recipe's one-line error."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import music.merging.io
from music.cli import main
from music.experiments.merge import Evaluation, Evaluator, Merge, SelectionError
from music.merging import DARE, TIES, Entry, Merger, Recipe, Source, StateDictReader, TaskArithmetic, fingerprint
from music.merging.methods import dare_mask
from music.task_vector import TaskVector, merge_vectors


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
    out, _ = merge(files, models=models(files, ("ft1", {}), ("ft2", {})),
                   method=TIES(density=0.5, scope="per_tensor"))
    # per tensor, keep the 2 largest |τ| of 4 in w (ties with the 2nd are kept), 1 of 2 in head:
    # τ1 w -> [[.5, 0], [-1, 0]], τ2 w -> [[-.5, .5], [.5, 0]]; signs: [[0?, +], [-, 0]]
    # (0,0): .5 - .5 = 0 -> 0; (0,1): only τ2 .5; (1,0): sum -.5 -> mean of agreeing (-1) = -1
    assert torch.equal(out["w"], torch.tensor([[1.0, 2.5], [2.0, 4.0]]))
    # head: τ1 -> [.5, 0], τ2 -> [0, 1]: disjoint, each kept alone
    assert torch.equal(out["head"], torch.tensor([1.0, 0.5]))


def test_global_ties_ranks_the_whole_model_before_merging_any_key(files):
    recipe = dict(models=models(files, ("ft1", {}), ("ft2", {"weight": -1.0})))
    out, _ = merge(files, "global.safetensors", **recipe, method=TIES(density=1 / 6))
    per_tensor, _ = merge(files, "per_tensor.safetensors", **recipe, method=TIES(density=1 / 6, scope="per_tensor"))
    base = load_file(files["base"])
    # 6 entries per vector over w and head together; only the largest |w τ| survives:
    # τ1 -> w [[0, 0], [-1, 0]], head [0, 0];  −τ2 -> w 0, head [0, -1]
    assert torch.equal(out["w"], base["w"] + torch.tensor([[0.0, 0.0], [-1.0, 0.0]]))
    assert torch.equal(out["head"], base["head"] + torch.tensor([0.0, -1.0]))
    # per tensor, each tensor keeps its own largest entry: τ1's head keeps its 0.5
    assert torch.equal(per_tensor["head"], base["head"] + torch.tensor([0.5, -1.0]))


def test_dare_linear_drops_per_entry_seed_and_rescales_before_weighting(files):
    out, _ = merge(files, models=models(files, ("ft1", {}), ("ft2", {"weight": 2.0})),
                   method=DARE(drop_rate=[0.5, 0.25], seed=3))
    base, ft1, ft2 = (load_file(files[n]) for n in ("base", "ft1", "ft2"))
    for key in ("w", "head"):
        t1, t2 = ((ft[key].double() - base[key].double()) for ft in (ft1, ft2))
        kept1, kept2 = dare_mask(key, t1.shape, 0.5, 3), dare_mask(key, t2.shape, 0.25, 4)  # entry i: seed + i
        update = torch.where(kept1, t1 / 0.5, 0) + torch.where(kept2, t2 / 0.75, 0) * 2.0
        assert torch.equal(out[key], (base[key].double() + update).float())
    kept = merge_vectors(DARE(drop_rate=0.5, seed=3), [TaskVector({"w": torch.ones(2, 2, dtype=torch.float64)})])
    assert set(kept.tensors["w"].flatten().tolist()) <= {0.0, 2.0}  # survivors are scaled by 1 / (1 - p)


def test_dare_ties_is_dare_then_ties_and_same_seed_same_output(files):
    recipe = dict(models=models(files, ("ft1", {}), ("ft2", {})),
                  method=DARE(drop_rate=0.5, seed=1, combine=TIES(density=1.0)))
    first, _ = merge(files, "a.safetensors", **recipe)
    again, _ = merge(files, "b.safetensors", **recipe)
    assert (files["dir"] / "a.safetensors").read_bytes() == (files["dir"] / "b.safetensors").read_bytes()
    base, ft1, ft2 = (load_file(files[n]) for n in ("base", "ft1", "ft2"))
    taus = [merge_vectors(DARE(drop_rate=0.5, seed=1 + i), [TaskVector.from_state_dicts(base, ft, dtype=torch.float64)])
            for i, ft in enumerate((ft1, ft2))]
    expected = merge_vectors(TIES(density=1.0), taus).apply_to(base)
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
    dict(method=TaskArithmetic(), lambda_=0.3),
    dict(method=TIES(scope="per_tensor", density=0.5)),
    dict(method=DARE(drop_rate=0.3, seed=5)),
    dict(method=DARE(combine=TIES(scope="per_tensor", density=0.7))),
    dict(exclude=["head"], dtype="bfloat16"),
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
    for name in ("base", "ft1"):  # torch files are read whole, as in-memory state_dicts
        torch.save(load_file(files[name]), files["dir"] / f"{name}.pt")
    torch_files = files | {"base": str(files["dir"] / "base.pt"), "ft1": str(files["dir"] / "ft1.pt")}
    entries["models"] = models(torch_files, ("ft1", {"weight": 0.7}))
    _, loaded = merge(torch_files, "loaded.safetensors", **entries, **recipe)
    from_torch, from_mmap = (load_file(str(files["dir"] / f"{n}.safetensors")) for n in ("loaded", "streamed"))
    assert all(from_torch[k].dtype == t.dtype and torch.equal(from_torch[k], t) for k, t in from_mmap.items())
    assert loaded["base_fingerprint"] == streamed["base_fingerprint"]


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
    monkeypatch.setattr("music.experiments.merge.Evaluator", lambda evaluation: FakeEvaluator(val_target, ft1["w"]))
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


TIES_PATH, DARE_PATH = "music.merging.TIES", "music.merging.DARE"


@pytest.mark.parametrize("recipe, message", [
    ({"method": "ties"}, r"method.*Expected a dot import path string: ties"),
    ({"method": {"class_path": "collections.OrderedDict"}}, r"collections.OrderedDict does not correspond to a subclass of MergeMethod"),
    ({"models": [{"path": "FT1", "weight": math.inf}]}, r"models\[0\].weight=inf is not allowed: it must be a finite number"),
    ({"method": {"class_path": TIES_PATH, "init_args": {"density": 0.0}}}, r"^error: TIES density=0.0 is not allowed: it must be in \(0, 1\]"),
    ({"method": {"class_path": TIES_PATH, "init_args": {"density": [1.0, 1.5]}}}, r"TIES density=1.5 .* in \(0, 1\]"),
    ({"method": {"class_path": TIES_PATH, "init_args": {"density": [0.5, 0.5]}}}, r"TIES density=\[0.5, 0.5\] gives 2 values for 1 entries"),
    ({"method": {"class_path": TIES_PATH, "init_args": {"scope": "layer"}}}, r"scope"),
    ({"method": {"class_path": DARE_PATH, "init_args": {"drop_rate": 1.0}}}, r"DARE drop_rate=1.0 .* in \[0, 1\)"),
    ({"models": [{"path": "FT1", "density": 0.5}]}, r"models.*density"),  # per-entry settings belong to the method
    ({"lambda_": []}, r"lambda_=\[\] is not allowed"),
    ({"lambda_": [0.0, 1.0]}, r"lambda_=\[0.0, 1.0\] is a grid but the recipe has no `evaluate`"),
    ({"lambda_": [0.0, 1.0], "evaluate": {"select_on": "test"}}, r"evaluate.select_on='test' is not allowed"),
    ({"models": []}, r"no models and no vectors"),
    ({"output": "o.pt"}, r"output='o.pt' is not allowed: .* .safetensors"),
    ({"stream": True, "method": {"class_path": TIES_PATH, "init_args": {"density": 0.5}}},
     r"stream: true with method TIES\(density=0.5, scope='global'\) is not allowed: it ranks every tensor at once"),
    ({"lambda_": 1e40}, r"coefficient 1e\+40 makes '(head|w)' non-finite"),
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
    monkeypatch.setattr(music.merging.io, "raw", lambda t: (_ for _ in ()).throw(OSError("disk full")))
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
    with pytest.raises(ValueError, match="stream: true with method TIES"):
        Recipe(base=files["base"], output=str(tmp_path / "x.safetensors"), models=[Source(files["ft1"])],
               method=TIES(density=0.5), stream=True)
    Recipe(base=files["base"], output=str(tmp_path / "x.safetensors"), models=[Source(files["ft1"])],
           method=TIES(density=1.0), stream=True)  # nothing trimmed: nothing global to rank


def test_torch_checkpoints_are_read_safely(files, tmp_path):
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in load_file(files["ft1"]).items()}}, tmp_path / "ft1.ckpt")
    out, _ = merge(files, models=[Source(str(tmp_path / "ft1.ckpt"))])
    assert torch.equal(out["w"], load_file(files["ft1"])["w"])


# -- a new method is one class and one recipe --------------------------------------------------

PLUGIN = '''
import torch
from music.merging import MergeMethod


class ElementwiseMax(MergeMethod):
    """Per coordinate, the weighted update of largest magnitude (a method MUSIC does not ship)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def merge(self, key, base, task_vectors, weights):
        stacked = torch.stack([t * w for t, w in zip(task_vectors, weights)])
        pick = stacked.abs().argmax(0, keepdim=True)
        return self.scale * stacked.gather(0, pick)[0]
'''


@pytest.mark.parametrize("stream", [False, True])
def test_a_new_method_is_one_class_and_one_recipe(files, monkeypatch, stream):
    package = files["dir"] / "plugins"
    package.mkdir(exist_ok=True)
    (package / "my_merge_methods.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(package))
    recipe = files["dir"] / "max.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": files["base"], "output": str(files["dir"] / f"max-{stream}.safetensors"), "stream": stream,
        "models": [{"path": files["ft1"]}, {"path": files["ft2"], "weight": 2.0}],
        "method": {"class_path": "my_merge_methods.ElementwiseMax", "init_args": {"scale": 0.5}}}))
    main(["merge", "--config", str(recipe)])
    out = load_file(str(files["dir"] / f"max-{stream}.safetensors"))
    # τ1 = [[.5, 0], [-1, .25]], 2·τ2 = [[-1, 1], [1, 0]]: largest magnitude per coordinate (first on ties), halved
    assert torch.equal(out["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]) + 0.5 * torch.tensor([[-1.0, 1.0], [-1.0, 0.25]]))
    assert torch.equal(out["head"], torch.tensor([0.5, -0.5]) + 0.5 * torch.tensor([0.5, 2.0]))
    written = yaml.safe_load((files["dir"] / f"max-{stream}.recipe.yaml").read_text())
    assert written["method"] == {"class_path": "my_merge_methods.ElementwiseMax", "init_args": {"scale": 0.5}}


# -- refused outputs and inputs ------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_non_finite_edit_is_refused_and_leaves_no_file(files, capsys, stream):
    out = files["dir"] / "o.safetensors"
    err = cli_error(capsys, "--config", recipe_file(files, lambda_=1e40, stream=stream))
    assert "non-finite" in err and "1e+40" in err
    assert not any(p.name.startswith("o.") for p in files["dir"].iterdir())
    out.write_bytes(b"precious")
    cli_error(capsys, "--config", recipe_file(files, lambda_=-1e40, stream=stream, overwrite=True))
    assert out.read_bytes() == b"precious"  # an existing output survives a refused edit
    assert sorted(p.name for p in files["dir"].iterdir() if p.name.startswith("o.")) == ["o.safetensors"]


@pytest.mark.parametrize("damage", [
    lambda data: data[:5],  # not even the header's length
    lambda data: (10**6).to_bytes(8, "little") + data[8:],  # a header longer than the file
    lambda data: data[:8] + b"[" + data[9:],  # JSON that does not parse
    lambda data: data[:-3],  # a truncated download
])
def test_a_corrupt_safetensors_input_is_one_line_naming_the_file(files, capsys, damage):
    path = files["dir"] / "ft1.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    for stream in (False, True):
        err = cli_error(capsys, "--config", recipe_file(files, stream=stream, overwrite=True))
        assert str(path) in err and ("bad header" in err or "truncated" in err), err
    assert not (files["dir"] / "o.safetensors").exists()


def test_the_merging_library_imports_neither_the_cli_nor_the_experiments():
    code = ("import sys, music.merging, music.task_vector; "
            "print(sorted(m for m in sys.modules if m.startswith(('music.cli', 'music.experiments'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_state_dicts_in_memory_merge_through_the_same_loop_as_files(files, tmp_path):
    base, ft1 = load_file(files["base"]), load_file(files["ft1"])
    readers = {Path("base"): StateDictReader(base), Path("ft1"): StateDictReader(ft1)}
    with Merger(Path("base"), [Entry("models[0]", Path("ft1"), 0.5, Path("base"))], TIES(density=0.5),
                readers=readers) as merger:
        state = merger.state(2.0, merger.updates())
    merge(files, "from_files.safetensors", models=models(files, ("ft1", {"weight": 0.5})), method=TIES(density=0.5),
          lambda_=2.0)
    from_files = load_file(str(files["dir"] / "from_files.safetensors"))
    assert state.keys() == from_files.keys() and all(torch.equal(state[k], from_files[k]) for k in state)
