"""Schedule store: JSON round trip, cache keys, fingerprints, names, and refusal of bad files."""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_fewstep.samplers import analytic
from comfyui_fewstep.samplers import calibration as cal
from comfyui_fewstep.samplers.schedule_store import (
    FORMAT,
    ScheduleRecord,
    ScheduleStore,
    cache_key,
    model_fingerprint,
    object_fingerprint,
)


def _record(**kw):
    base = {"sigmas": [14.6, 3.0, 0.5, 0.0], "nfe": 3, "solver": {"solver": "multistep", "options": {"order": 2}}}
    base.update(kw)
    return ScheduleRecord(**base)


def test_round_trip_and_plain_json(tmp_path):
    store = ScheduleStore(tmp_path)
    rec = _record(model_hash="abc", settings={"nfe": 3}, cost={"total_nfe": 100}, orders=[1, 2, 1], error=0.01)
    path = store.save("my sd15 schedule", rec)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["sigmas"] == [14.6, 3.0, 0.5, 0.0] and data["created"]
    back = store.load("my sd15 schedule")
    assert back == rec
    assert store.names() == ["my sd15 schedule"]
    assert torch.equal(back.sigmas_tensor(), torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float32))
    # a hand-written file with only sigmas is accepted (nfe from its length)
    (tmp_path / "hand.json").write_text('{"sigmas": [1.0, 0.2, 0]}')
    assert store.load("hand").nfe == 2


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ("[1, 0]", "expected a JSON object"),
    ('{"sigmas": [1.0, 2.0, 0]}', "strictly decreasing"),
    ('{"sigmas": [1.0, 0.5]}', "must end in 0"),
    ('{"format": "other/1", "sigmas": [1, 0]}', "unknown format"),
    ('{"nfe": 3}', "no 'sigmas'"),
    # hand-edited fields of the wrong type name the field, instead of a bare Python error later
    ('{"sigmas": [1, 0], "solver": "dpmpp_2m"}', "'solver' must be a JSON object"),
    ('{"sigmas": [1, 0], "solver": {"options": [1, 2]}}', "'solver.options' must be a JSON object"),
    ('{"sigmas": [1, 0], "solver": {"solver": 2}}', "'solver.solver' must be a string"),
    ('{"sigmas": [1, 0], "orders": null}', "'orders' must be a list of positive integers"),
    ('{"sigmas": [1, 0], "orders": [true]}', "'orders' must be a list of positive integers"),
    ('{"sigmas": [1, 0], "settings": []}', "'settings' must be a JSON object"),
    ('{"sigmas": [1, 0], "settings": {"parameterization": ["ve"]}}', "'settings.parameterization' must be"),
    ('{"sigmas": [1, 0], "settings": {"parameterization": ["ve", 0.03]}}',
     "'settings.parameterization' must be"),
    ('{"sigmas": [1, 0], "model_hash": 5}', "'model_hash' must be a string"),
    ('{"sigmas": [1, 0], "error": "small"}', "'error' must be a number"),
    ('{"sigmas": [true, false]}', "must be a list of numbers"),
    ('{"sigmas": [1, 0], "nfe": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"sigmas": [' + ", ".join(str(20000 - i) for i in range(20000)) + ", 0]}", "at most 10001"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, match):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=match) as caught:
        ScheduleStore(tmp_path).load("bad")
    assert "bad.json" in str(caught.value)


def test_a_file_that_is_not_utf8_names_itself(tmp_path):
    (tmp_path / "latin.json").write_bytes('{"sigmas": [1, 0], "label": "sch\u00f6n"}'.encode("utf-16"))
    with pytest.raises(ValueError, match="latin.json is not UTF-8 text"):
        ScheduleStore(tmp_path).load("latin")


def test_fitted_coefficients_stay_bound_to_their_sigmas(tmp_path):
    """A fitted record carries a digest of its sigmas and coefficients: an edit to either is
    refused at loading (the old coefficients would run on new sigmas); a file from before the
    digest existed still loads; absurd coefficients are refused as damage."""
    store = ScheduleStore(tmp_path)
    rec = _record(coefficients=[[0.1, 0.2], [0.05, -0.3, 0.1, 0.2], [0.4, 0.0]])
    path = store.save("fitted", rec)
    assert store.load("fitted") == rec and rec.fitted_digest
    data = json.loads(path.read_text())
    for edit in ("sigmas", "coefficients"):
        changed = json.loads(json.dumps(data))
        if edit == "sigmas":
            changed["sigmas"][2] = 0.4
        else:
            changed["coefficients"][1][0] = 0.06
        (tmp_path / "edited.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="changed after calibration.*calibrate again"):
            store.load("edited")
    del data["fitted_digest"]
    (tmp_path / "older.json").write_text(json.dumps(data))
    assert store.load("older").coefficients == rec.coefficients
    data["coefficients"][0][0] = 1e30
    (tmp_path / "damaged.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="step 1 are .*of order 1"):
        store.load("damaged")


def test_names_cannot_escape_the_folder(tmp_path):
    store = ScheduleStore(tmp_path)
    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not allowed"):
            store.path_for(name)
        with pytest.raises(ValueError, match="not allowed"):
            store.load(name)
    with pytest.raises(ValueError, match="no saved schedule named 'missing'"):
        store.load("missing")


def test_every_listed_schedule_loads(tmp_path):
    """Shared files keep whatever name they came with (a browser's second download, non-ASCII);
    every name the Load Schedule dropdown shows must load. Hidden and temporary files, folders and
    links to files outside the folder are neither listed nor loaded."""
    folder = tmp_path / "schedules"
    folder.mkdir()
    text = '{"sigmas": [1.0, 0.2, 0]}'
    for name in ("sd15 4nfe (1).json", "\u8abf\u5ea6.json", "sch\u00f6n.json", "x.json.json", "plain.json",
                 ".tmp-abc123.json"):
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "dir.json").mkdir()
    (tmp_path / "outside.json").write_text('{"sigmas": [9.0, 0]}')
    (folder / "link.json").symlink_to(tmp_path / "outside.json")
    (folder / "inside link.json").symlink_to(folder / "plain.json")
    store = ScheduleStore(folder)
    names = store.names()
    assert names == sorted(["sd15 4nfe (1)", "\u8abf\u5ea6", "sch\u00f6n", "x.json", "plain", "inside link"])
    for name in names:
        assert store.load(name).sigmas == [1.0, 0.2, 0.0]
    assert store.load("plain.json").sigmas == [1.0, 0.2, 0.0]  # the file name as typed
    with pytest.raises(ValueError, match="link to a file outside"):
        store.load("link")
    with pytest.raises(ValueError, match="not allowed"):
        store.load(".tmp-abc123")


def test_cache_get_put_and_corrupt_entries(tmp_path):
    store = ScheduleStore(tmp_path)
    key = cache_key("h1", {"nfe": 6, "solver": "dpmpp_2m"})
    assert key != cache_key("h2", {"nfe": 6, "solver": "dpmpp_2m"}) != cache_key("h1", {"nfe": 5, "solver": "dpmpp_2m"})
    assert key == cache_key("h1", {"solver": "dpmpp_2m", "nfe": 6})
    assert store.get(key) is None
    store.put(key, _record())
    assert store.get(key).sigmas == [14.6, 3.0, 0.5, 0.0]
    (store.cache_dir / f"{key}.json").write_text("{broken")
    assert store.get(key) is None
    with pytest.raises(ValueError, match="hex digest"):
        store.put("../evil", _record())
    assert store.names() == []  # cache entries are not named schedules


def test_model_fingerprint_sees_weights_shapes_and_extra():
    torch.manual_seed(0)
    a = {"w": torch.randn(300, 70), "b": torch.randn(70)}
    h = model_fingerprint(a.items())
    assert h == model_fingerprint(reversed(list(a.items())))
    changed = {"w": a["w"].clone(), "b": a["b"]}
    changed["w"][0, 0] += 1.0  # the first element is always sampled
    assert model_fingerprint(changed.items()) != h
    assert model_fingerprint({"w": a["w"].reshape(70, 300), "b": a["b"]}.items()) != h
    assert model_fingerprint(a.items(), extra="patch-uuid") != h


def test_model_fingerprint_of_a_tensor_past_float32_integers():
    """SD1.5's largest UNet weight has 1280 x 2560 x 3 x 3 = 29,491,200 elements, past 2^24 where
    float32 no longer holds every integer: the sampled indices stay in range and the last element
    is among them."""
    n = 1280 * 2560 * 9
    w = torch.zeros(n, dtype=torch.uint8)
    h = model_fingerprint([("w", w)])
    w[-1] = 1
    assert model_fingerprint([("w", w)]) != h


def test_record_from_a_calibration_result(tmp_path):
    data = analytic.GaussianData(c=1.0, dim=4)
    p = analytic.RANGE_PRESETS["edm"].parameterization()
    x = data.sample(2, p.sigma_max, generator=torch.Generator().manual_seed(0))
    res = cal.calibrate(analytic.CountingDenoiser(data), x, p, 4, grid_points=20, search_nfe=20)
    rec = ScheduleRecord.from_result(res, "hash", {"nfe": 4})
    assert rec.sigmas == res.sigmas and rec.cost["total_nfe"] == res.cost["total_nfe"] and rec.orders == res.orders
    store = ScheduleStore(tmp_path)
    store.put(cache_key("hash", {"nfe": 4}), rec)
    assert store.get(cache_key("hash", {"nfe": 4})) == rec


def _scale(factor):
    def wrapper(apply, args):
        return apply(args["input"]) * factor
    return wrapper


class _Patch:
    def __init__(self, weights, strength):
        self.weights, self.strength = weights, strength


def test_object_fingerprint_sees_values_code_and_closures_not_identity():
    """What a patch computes with changes the hash; rebuilding the same patch (new objects, new
    addresses, as in another session) does not."""
    torch.manual_seed(0)
    up = torch.randn(8, 4)

    def options(factor=0.5, strength=1.0, tensor=up):
        return {"patches": {"proj.weight": [(strength, _Patch((tensor.clone(), None), 1.0), 1.0, None, None)]},
                "model_options": {"transformer_options": {}, "wrapper": _scale(factor)}, "shift": 3.0}

    h = object_fingerprint(options())
    assert object_fingerprint(options()) == h  # fresh objects with the same content
    assert object_fingerprint(options(factor=0.6)) != h  # a closure value
    assert object_fingerprint(options(strength=0.9)) != h  # a patch strength
    other = up.clone()
    other[0, 0] += 1.0
    assert object_fingerprint(options(tensor=other)) != h  # a patch tensor
    changed = options()
    changed["model_options"]["wrapper"] = lambda apply, args: apply(args["input"]) * 0.5
    assert object_fingerprint(changed) != h  # other code
    cyclic = options()
    cyclic["self"] = cyclic
    assert object_fingerprint(cyclic) == object_fingerprint(cyclic)


def test_object_fingerprint_reaches_deep_patch_settings_and_module_attributes():
    """An attention-replace patch keeps its weight 9 levels below the model options, and a flow
    model_sampling keeps its shift and timestep multiplier as plain attributes: both change what
    the model computes, so both change the hash."""
    class Replace:  # like an IPAdapter attn2 replacement: callbacks plus per-call kwargs
        def __init__(self, weight):
            self.callback, self.kwargs = [lambda q, k, v, **kw: q], [{"weight": weight}]

    def options(weight):
        return {"model_options": {"transformer_options": {"patches_replace": {"attn2": {
            ("input", 1): Replace(weight)}}}}}

    assert object_fingerprint(options(1.0)) == object_fingerprint(options(1.0))
    assert object_fingerprint(options(1.0)) != object_fingerprint(options(0.2))

    class Sampling(torch.nn.Module):
        def __init__(self, multiplier):
            super().__init__()
            self.shift, self.multiplier = 3.0, multiplier
            self.register_buffer("sigmas", torch.linspace(0.001, 1.0, 10))

    assert object_fingerprint(Sampling(1000)) == object_fingerprint(Sampling(1000))
    assert object_fingerprint(Sampling(1000)) != object_fingerprint(Sampling(1.0))  # SD3 vs AuraFlow


def test_object_fingerprint_tells_classes_made_at_run_time_apart():
    """ComfyUI's ModelSamplingDiscrete node builds eps and v classes with one qualified name."""
    def make(base):
        class Sampling(base, torch.nn.Module):
            pass
        return Sampling()

    class Eps:
        pass

    class V:
        pass

    assert object_fingerprint(make(Eps)) != object_fingerprint(make(V))
    assert object_fingerprint(make(Eps)) == object_fingerprint(make(Eps))
