"""Invariants of music.task_vector and the per-tensor merge methods of music.merging: algebra,
strictness, safety, TIES and DARE, and file round trips."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from music.merging import DARE, TIES, SafetensorsReader, fingerprint
from music.task_vector import (
    ApplyReport,
    BaseMismatchWarning,
    TaskVector,
    TaskVectorError,
    apply_safetensors,
    merge_vectors,
)

PROPERTY = settings(max_examples=30, deadline=None)


def ties_merge(vectors, density=0.2, scope="global"):
    return merge_vectors(TIES(density=density, scope=scope), vectors)


def dare(vector, drop_rate, seed):
    return merge_vectors(DARE(drop_rate=drop_rate, seed=seed), [vector])


@st.composite
def state_dict_pairs(draw, dyadic: bool = False):
    """Two state_dicts with the same keys and shapes (pretrained, finetuned).

    ``dyadic`` draws multiples of 1/64 below 16 in magnitude: their differences and sums are
    exact in float32, so pre + (ft - pre) == ft can be asserted bit for bit.
    """
    values = (st.integers(-1024, 1024).map(lambda k: k / 64) if dyadic
              else st.floats(-100, 100, width=32, allow_subnormal=False))
    pre, ft = {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
        n = math.prod(shape)
        for sd in (pre, ft):
            sd[f"layer{i}.weight"] = torch.tensor(
                draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)
    return pre, ft


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def finetuned(net: nn.Module) -> nn.Module:
    """A copy with perturbed parameters and updated BatchNorm statistics."""
    ft = copy.deepcopy(net)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ft.train()
    ft(torch.randn(8, 4))
    return ft


# ---------------------------------------------------------------- algebra (property-based)

@PROPERTY
@given(state_dict_pairs())
def test_vector_plus_its_negation_is_zero(pair):
    tv = TaskVector.from_state_dicts(*pair)
    zero = tv + (-tv)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in zero.tensors.values())
    assert zero.norm() == 0.0


@PROPERTY
@given(state_dict_pairs())
def test_zero_coefficient_returns_the_original(pair):
    pre, ft = pair
    assert_same(TaskVector.from_state_dicts(pre, ft).apply_to(pre, 0.0), pre)


@PROPERTY
@given(state_dict_pairs(dyadic=True))
def test_unit_coefficient_reproduces_finetuned_exactly_on_dyadic_values(pair):
    pre, ft = pair
    assert_same(TaskVector.from_state_dicts(pre, ft).apply_to(pre, 1.0), ft)


@PROPERTY
@given(state_dict_pairs())
def test_unit_coefficient_reproduces_finetuned_within_rounding(pair):
    # pre + (ft - pre) rounds twice, so only closeness to a few ulps of 100 holds in general.
    pre, ft = pair
    out = TaskVector.from_state_dicts(pre, ft).apply_to(pre, 1.0)
    for k in ft:
        torch.testing.assert_close(out[k], ft[k], rtol=0, atol=3e-5)


@PROPERTY
@given(state_dict_pairs(), st.floats(-2, 2), st.floats(-2, 2))
def test_apply_is_linear_in_the_coefficient(pair, a, b):
    pre, ft = pair
    tv = TaskVector.from_state_dicts(pre, ft)
    with warnings.catch_warnings():  # the second step applies to a non-base model, by design
        warnings.simplefilter("ignore", BaseMismatchWarning)
        stepwise = tv.apply_to(tv.apply_to(pre, a), b)
    at_once = tv.apply_to(pre, a + b)
    for k in pre:
        torch.testing.assert_close(stepwise[k], at_once[k], rtol=1e-5, atol=1e-3)


@PROPERTY
@given(state_dict_pairs(), st.integers(1, 4))
def test_sum_scalar_and_norm_agree(pair, n):
    tv = TaskVector.from_state_dicts(*pair)
    assert sum([tv]) is tv
    for k, t in (tv * 2.0).tensors.items():
        assert torch.equal(t, (2.0 * tv).tensors[k])
        assert torch.equal(t, (tv + tv).tensors[k])
        assert torch.equal(t, sum([tv, tv]).tensors[k])
    assert math.isclose((tv * n).norm(), n * tv.norm(), rel_tol=1e-6)
    flat = torch.cat([t.double().flatten() for t in tv.tensors.values()])
    assert math.isclose(tv.norm(), float(flat.norm()), rel_tol=1e-9)
    if tv.norm() > 0:
        assert math.isclose(tv.cosine(tv * n), 1.0, rel_tol=1e-6)
        assert math.isclose(tv.cosine(-tv), -1.0, rel_tol=1e-6)


def test_cosine_of_orthogonal_and_zero_vectors():
    a = TaskVector({"w": torch.tensor([1.0, 0.0])})
    b = TaskVector({"w": torch.tensor([0.0, 3.0])})
    assert a.cosine(b) == 0.0
    with pytest.raises(TaskVectorError, match="zero"):
        a.cosine(a - a)


def test_vector_is_immutable_and_scalars_are_validated():
    tv = TaskVector({"w": torch.ones(2)})
    with pytest.raises(TypeError):
        tv.tensors["w"] = torch.zeros(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tv.base_fingerprint = "x"
    with pytest.raises(TypeError):
        tv * "2"
    with pytest.raises(TypeError):
        1 + tv
    for bad in (math.nan, math.inf):
        with pytest.raises(TaskVectorError, match="scalar=.* is not allowed: it must be a finite number"):
            tv * bad
        with pytest.raises(TaskVectorError, match="scaling_coef=.* is not allowed: it must be a finite number"):
            tv.apply_to({"w": torch.zeros(2)}, bad)
    with pytest.raises(TaskVectorError, match="floating"):
        TaskVector({"n": torch.tensor(3)})


# ---------------------------------------------------------------- strictness

def test_key_mismatch_lists_first_five_keys_then_count():
    pre = {f"k{i}": torch.zeros(1) for i in range(8)}
    ft = {f"j{i}": torch.zeros(1) for i in range(2)}
    with pytest.raises(TaskVectorError) as err:
        TaskVector.from_state_dicts(pre, ft)
    msg = str(err.value)
    assert "keys missing from finetuned: k0, k1, k2, k3, k4 ... and 3 more" in msg
    assert "keys missing from pretrained: j0, j1" in msg and msg.count("more") == 1


def test_shape_mismatch_names_key_and_both_shapes():
    pre = {"a": torch.zeros(3, 4), "b": torch.zeros(2)}
    with pytest.raises(TaskVectorError, match=r"a \(3, 4\) vs \(4, 3\)"):
        TaskVector.from_state_dicts(pre, {"a": torch.zeros(4, 3), "b": torch.zeros(2)})
    tv = TaskVector.from_state_dicts(pre, pre)
    with pytest.raises(TaskVectorError, match=r"b \(2,\) vs \(5,\)"):
        tv.apply_to({"a": torch.zeros(3, 4), "b": torch.zeros(5)})
    with pytest.raises(TaskVectorError, match="keys missing from target: b"):
        tv.apply_to({"a": torch.zeros(3, 4)})
    with pytest.raises(TaskVectorError, match="keys missing from right vector: b"):
        tv + TaskVector({"a": torch.zeros(3, 4)})


def test_integer_buffers_are_skipped_visibly_and_buffer_policy():
    net = tiny_net()
    ft = finetuned(net)
    params = ["0.bias", "0.weight", "1.bias", "1.weight", "2.bias", "2.weight"]
    from_sd = TaskVector.from_state_dicts(net.state_dict(), ft.state_dict())
    assert list(from_sd.tensors) == sorted(params + ["1.running_mean", "1.running_var"])
    assert "int64" in from_sd.skipped["1.num_batches_tracked"]
    from_mod = TaskVector.from_modules(net, ft)
    assert list(from_mod.tensors) == params
    assert set(from_mod.skipped) == {"1.num_batches_tracked", "1.running_mean", "1.running_var"}
    assert "buffer" in from_mod.skipped["1.running_var"]
    assert "1.running_var" in TaskVector.from_modules(net, ft, include_buffers=True).tensors
    with pytest.raises(TaskVectorError, match="needs parameter_names"):
        TaskVector.from_state_dicts(net.state_dict(), ft.state_dict(), include_buffers=False)
    with pytest.raises(TaskVectorError, match="backbone.0.weight"):
        TaskVector.from_state_dicts(net.state_dict(), ft.state_dict(), include_buffers=False,
                                    parameter_names={"backbone.0.weight"})


def test_apply_to_module_gives_finetuned_parameters_and_keeps_base_buffers():
    net = tiny_net()
    ft = finetuned(net)
    out, report = TaskVector.from_modules(net, ft).apply_to(net, report=True)
    assert report.skipped == ("1.num_batches_tracked", "1.running_mean", "1.running_var")
    assert report.base_matches is True and report.cast == ()
    for k, v in ft.state_dict().items():
        expected = v if k in report.applied else net.state_dict()[k]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_apply_to_never_mutates_its_input():
    net = tiny_net()
    ft = finetuned(net)
    tv = TaskVector.from_state_dicts(net.state_dict(), ft.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for target in (net, net.state_dict()):
        out = tv.apply_to(target, 3.0)
        for t in out.values():  # the output shares no storage with the input
            t.add_(1)
    assert_same(net.state_dict(), before)


def test_dtype_and_device_preserved_and_casts_reported():
    pre = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    tv = TaskVector.from_state_dicts(pre, {"w": torch.tensor([1.5, 2.25]), "n": torch.tensor(9)})
    assert tv.tensors["w"].dtype == torch.float32 and "n" in tv.skipped
    half = {"w": pre["w"].half(), "n": pre["n"], "extra": torch.ones(1, dtype=torch.bfloat16)}
    with pytest.warns(BaseMismatchWarning):
        out, report = tv.apply_to(half, 2.0, report=True)
    assert out["w"].dtype == torch.float16 and out["w"].device == half["w"].device
    assert torch.equal(out["w"], torch.tensor([2.0, 2.5], dtype=torch.float16))
    assert out["n"].dtype == torch.int64 and out["extra"].dtype == torch.bfloat16
    assert report == ApplyReport(applied=("w",), skipped=("extra", "n"), cast=("w",),
                                 base_matches=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_preserved_on_cuda():
    pre = {"w": torch.zeros(3, device="cuda", dtype=torch.bfloat16)}
    tv = TaskVector({"w": torch.ones(3)}, fingerprint(pre))
    out = tv.apply_to(pre, 0.5)
    assert out["w"].device == pre["w"].device and out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"].cpu(), torch.full((3,), 0.5, dtype=torch.bfloat16))


def test_base_match_is_reported_and_mismatch_warns():
    pre = {"w": torch.zeros(2)}
    tv = TaskVector.from_state_dicts(pre, {"w": torch.ones(2)})
    assert tv.base_fingerprint == fingerprint({"w": torch.zeros(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tv.apply_to(pre, report=True)[1].base_matches is True
    with pytest.warns(BaseMismatchWarning, match="other than its base"):
        assert tv.apply_to({"w": torch.ones(2)}, report=True)[1].base_matches is False
    assert fingerprint({"w": torch.zeros(2)}) != fingerprint({"w": torch.zeros(2, 1)})
    assert fingerprint({"w": torch.zeros(2)}) != fingerprint({"w": torch.zeros(2).double()})
    assert fingerprint({"w": torch.zeros(2)}) != fingerprint({"v": torch.zeros(2)})


# ---------------------------------------------------------------- merges

def test_ties_merge_hand_computed():
    vs = [TaskVector({"w": torch.tensor(v)}) for v in (
        [4.0, -1.0, 2.0, 0.5, -3.0],    # top 3 of 5 (density 0.6): [4, 0, 2, 0, -3]
        [-2.0, 5.0, 1.0, -4.0, 0.1],    # -> [-2, 5, 0, -4, 0]
        [3.0, -6.0, -1.0, 1.0, 2.0])]   # -> [3, -6, 0, 0, 2]
    # sums [5, -1, 2, -4, -1] elect [+, -, +, -, -]; means of agreeing nonzero values:
    expected = torch.tensor([3.5, -6.0, 2.0, -4.0, -3.0])
    for scope in ("global", "per_tensor"):
        assert torch.equal(ties_merge(vs, density=0.6, scope=scope).tensors["w"], expected)


def test_ties_zero_sign_sum_gives_zero_and_full_density_keeps_all():
    a = TaskVector({"w": torch.tensor([2.0, 1.0])})
    b = TaskVector({"w": torch.tensor([-2.0, 3.0])})
    assert torch.equal(ties_merge([a, b], density=1.0).tensors["w"], torch.tensor([0.0, 2.0]))
    assert torch.equal(ties_merge([a], density=1.0).tensors["w"], a.tensors["w"])


def test_ties_global_and_per_tensor_trimming_differ():
    v = TaskVector({"a": torch.tensor([10.0, -8.0, 6.0, 4.0]), "b": torch.tensor([0.3, -0.1])})
    per = ties_merge([v], density=0.5, scope="per_tensor")  # 2 of a, 1 of b
    assert torch.equal(per.tensors["a"], torch.tensor([10.0, -8.0, 0.0, 0.0]))
    assert torch.equal(per.tensors["b"], torch.tensor([0.3, 0.0]))
    glob = ties_merge([v], density=0.5)  # 3 of all 6: b is trimmed away entirely
    assert torch.equal(glob.tensors["a"], torch.tensor([10.0, -8.0, 6.0, 0.0]))
    assert torch.equal(glob.tensors["b"], torch.tensor([0.0, 0.0]))


def test_ties_validation():
    v = TaskVector({"w": torch.ones(2)})
    for bad in (0, 1.5, math.nan):
        with pytest.raises(TaskVectorError, match="density"):
            ties_merge([v], density=bad)
    with pytest.raises(TaskVectorError, match="TIES scope='layer' is not allowed: choose 'global' or 'per_tensor'"):
        ties_merge([v], scope="layer")
    with pytest.raises(TaskVectorError, match="non-empty"):
        ties_merge([])
    with pytest.raises(TaskVectorError, match="keys missing"):
        ties_merge([v, TaskVector({"u": torch.ones(2)})])


def test_dare_hand_computed():
    t = torch.tensor([1.0, -2.0, 4.0, 0.5] * 250)
    v = TaskVector({"w": t}, base_fingerprint="abc", sources={"x": "y"})
    assert torch.equal(dare(v, drop_rate=0.0, seed=1).tensors["w"], t)
    out = dare(v, drop_rate=0.5, seed=1)
    w = out.tensors["w"]
    kept = w != 0
    assert torch.equal(w[kept], 2 * t[kept])  # survivors rescaled by 1 / (1 - 0.5) = 2
    assert 400 < int(kept.sum()) < 600  # Binomial(1000, 0.5): 6 standard deviations
    assert out.base_fingerprint == "abc" and dict(out.sources) == {"x": "y"}


def test_dare_is_independent_of_order_and_other_keys():
    a, b = torch.randn(50), torch.randn(3, 7)
    one = dare(TaskVector({"a": a, "b": b}), drop_rate=0.3, seed=7)
    two = dare(TaskVector({"b": b, "a": a}), drop_rate=0.3, seed=7)
    alone = dare(TaskVector({"a": a}), drop_rate=0.3, seed=7)
    assert_same(dict(one.tensors), dict(two.tensors))
    assert torch.equal(one.tensors["a"], alone.tensors["a"])
    assert not torch.equal(one.tensors["a"], dare(TaskVector({"a": a}), drop_rate=0.3,
                                                  seed=8).tensors["a"])
    twins = dare(TaskVector({"x": torch.ones(100), "y": torch.ones(100)}), drop_rate=0.5, seed=7)
    assert not torch.equal(twins.tensors["x"], twins.tensors["y"])  # masks differ per key


def test_dare_validation():
    v = TaskVector({"w": torch.ones(2)})
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(TaskVectorError, match=r"DARE drop_rate=.* is not allowed: it must be (in \[0, 1\)|a finite)"):
            dare(v, drop_rate=bad, seed=0)
    with pytest.raises(TaskVectorError, match="DARE seed='0' is not allowed: it must be an integer"):
        dare(v, drop_rate=0.1, seed="0")


# ---------------------------------------------------------------- files

def mixed_base() -> dict:
    """Covers the streaming writer's corners: several dtypes, 0-d, empty and int tensors."""
    torch.manual_seed(1)
    return {"a.weight": torch.randn(5, 3), "a.bias": torch.randn(3, dtype=torch.float64),
            "h": torch.randn(4).half(), "bf": torch.randn(2, 2).bfloat16(),
            "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
            "steps": torch.tensor(12), "mask": torch.tensor([True, False])}


def test_safetensors_round_trip(tmp_path):
    base = mixed_base()
    ft = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    torch.save(base, tmp_path / "pre.pt")
    torch.save(ft, tmp_path / "ft.pt")
    tv = TaskVector.from_checkpoints(tmp_path / "pre.pt", tmp_path / "ft.pt")
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert_same(dict(back.tensors), dict(tv.tensors))
    assert back.base_fingerprint == tv.base_fingerprint == fingerprint(base)
    assert dict(back.skipped) == dict(tv.skipped) and set(tv.skipped) == {"steps", "mask"}
    assert dict(back.sources) == {"pretrained": str(tmp_path / "pre.pt"),
                                  "finetuned": str(tmp_path / "ft.pt")}
    with safe_open(str(tmp_path / "tv.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["base_fingerprint"]) == fingerprint(base)


def test_streaming_apply_equals_in_memory_apply_exactly(tmp_path):
    base = mixed_base()
    torch.manual_seed(2)
    tv = TaskVector({k: torch.randn(v.shape) for k, v in base.items()
                     if v.is_floating_point() and k != "bf"}, fingerprint(base))
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    tv.save(tmp_path / "tv.safetensors")
    report = apply_safetensors(tmp_path / "base.safetensors", tmp_path / "tv.safetensors",
                               tmp_path / "out.safetensors", scaling_coef=0.7)
    expected, expected_report = tv.apply_to(load_file(str(tmp_path / "base.safetensors")),
                                            0.7, report=True)
    assert_same(load_file(str(tmp_path / "out.safetensors")), expected)
    header_size = int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")
    assert header_size % 8 == 0  # keeps every tensor's data 8-byte aligned, as safetensors does
    assert report == expected_report and report.base_matches is True
    assert report.skipped == ("bf", "mask", "steps") and "h" in report.cast
    with pytest.warns(BaseMismatchWarning):  # applying the output again: not the base
        apply_safetensors(tmp_path / "out.safetensors", tmp_path / "tv.safetensors",
                          tmp_path / "out2.safetensors")
    unchecked = apply_safetensors(tmp_path / "out.safetensors", tmp_path / "tv.safetensors",
                                  tmp_path / "out3.safetensors", check_base=False)  # no warning: not hashed
    assert unchecked.base_matches is None
    assert (tmp_path / "out2.safetensors").read_bytes() == (tmp_path / "out3.safetensors").read_bytes()


def test_streaming_apply_refuses_mismatch_and_leaves_no_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "base.safetensors"))
    TaskVector({"a": torch.ones(3), "b": torch.ones(1)}).save(tmp_path / "tv.safetensors")
    with pytest.raises(TaskVectorError, match=r"keys missing from base: b.*a \(3,\) vs \(2,\)"):
        apply_safetensors(tmp_path / "base.safetensors", tmp_path / "tv.safetensors",
                          tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tv.safetensors"]
    save_file({"a": torch.zeros(3), "b": torch.zeros(1)}, str(tmp_path / "base.safetensors"))
    data = (tmp_path / "base.safetensors").read_bytes()
    (tmp_path / "base.safetensors").write_bytes(data[:-2])  # truncated download
    with pytest.raises(TaskVectorError, match="truncated"):
        apply_safetensors(tmp_path / "base.safetensors", tmp_path / "tv.safetensors",
                          tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_a_non_finite_apply_is_refused_in_memory_and_streaming(tmp_path):
    pre = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    tv = TaskVector.from_state_dicts(pre, {"w": torch.tensor([1.5, 2.0]), "b": torch.tensor([1.0])})
    with pytest.raises(TaskVectorError, match=r"coefficient 1e\+40 makes '(b|w)' non-finite"):
        tv.apply_to(pre, 1e40)  # finite in float64, inf once cast back to float32
    save_file(pre, str(tmp_path / "base.safetensors"))
    tv.save(tmp_path / "tv.safetensors")
    with pytest.raises(TaskVectorError, match="non-finite"):
        apply_safetensors(tmp_path / "base.safetensors", tmp_path / "tv.safetensors", tmp_path / "out.safetensors", 1e40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tv.safetensors"]


@pytest.mark.parametrize("header", [b"", b"\x05\x00", (2**40).to_bytes(8, "little"), (4).to_bytes(8, "little") + b"[1, ",
                                    (2).to_bytes(8, "little") + b"[]", (16).to_bytes(8, "little") + b'{"w": {"x": 1}} ',
                                    (48).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}'[:48]])
def test_a_corrupt_safetensors_header_is_one_line_naming_the_file(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header)
    with pytest.raises(TaskVectorError) as err:
        SafetensorsReader(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
