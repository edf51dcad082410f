import pytest

from helpers.profiles import ProfileError, list_profiles, load_profile


def test_shipped_profiles_validate():
    assert {"cpu-smoke", "cpu-lab", "rtx4090"} <= set(list_profiles())
    for name in list_profiles():
        assert load_profile(name).name == name


def test_seed_setup_is_the_rtx4090_profile():
    p = load_profile("rtx4090")
    assert p.model.requires_gpu and p.model.load_in_4bit and p.model.max_seq_length == 2048
    assert (p.lora.r, p.lora.alpha) == (16, 16)
    assert (p.train.per_device_train_batch_size, p.train.gradient_accumulation_steps) == (2, 4)
    assert p.train.optim == "adamw_8bit"


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(ProfileError, match="Unknown profile 'gpu-huge'.*cpu-lab.*cpu-smoke"):
        load_profile("gpu-huge")


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    text = (load_profile.__globals__["PROFILES_DIR"] / "cpu-smoke.yaml").read_text()
    path.write_text(text.replace("  r: 8", "  rank: 8"))
    with pytest.raises(ProfileError, match=r"lora.rank: Extra inputs are not permitted"):
        load_profile(path)


def test_wrong_type_is_an_error_not_a_coercion():
    with pytest.raises(ProfileError, match=r"train.max_steps"):
        load_profile("cpu-smoke", {"train": {"max_steps": "4"}})
    with pytest.raises(ProfileError, match=r"model.requires_gpu"):
        load_profile("cpu-smoke", {"model": {"requires_gpu": "false"}})


def test_overrides_merge_into_sections():
    p = load_profile("cpu-smoke", {"train": {"max_steps": 9}})
    assert p.train.max_steps == 9
    assert p.train.learning_rate == load_profile("cpu-smoke").train.learning_rate


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_profiles_are_lean_each_holds_only_what_differs_from_its_parent():
    import yaml

    from helpers.profiles import PROFILES_DIR, _read

    for name in list_profiles():
        own = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())
        assert "extends" in own, f"{name} should extend base (or another profile)"
        parent = _leaves(_read(PROFILES_DIR / f"{own.pop('extends')}.yaml"))
        repeated = [k for k, v in _leaves(own).items() if parent.get(k, object()) == v]
        assert not repeated, f"{name} repeats what it inherits: {repeated}"


def test_extends_errors_name_the_file(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop\nname: loop\n")
    (tmp_path / "missing.yaml").write_text("extends: no-such-profile\nname: x\n")
    import helpers.profiles

    original = helpers.profiles.PROFILES_DIR
    helpers.profiles.PROFILES_DIR = tmp_path
    try:
        with pytest.raises(ProfileError, match="extends itself: loop -> loop"):
            load_profile(loop)
    finally:
        helpers.profiles.PROFILES_DIR = original
    with pytest.raises(ProfileError, match="extends 'no-such-profile', but there is no"):
        load_profile(tmp_path / "missing.yaml")


def test_a_child_overrides_its_parent_and_keeps_the_rest():
    lab, gpu = load_profile("rtx4090"), load_profile("gpu-80gb")  # gpu-80gb extends rtx4090
    assert gpu.lora.r == 32 and gpu.train.learning_rate == lab.train.learning_rate
    assert gpu.name == "gpu-80gb" and gpu.description != lab.description
    assert "base" not in list_profiles(), "base holds shared values; it is not a profile to run"
    assert load_profile("cpu-lab").infer.system_prompt == load_profile("rtx4090").infer.system_prompt


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate"),  # passes gt=0
        ({"train": {"weight_decay": float("inf")}}, "train.weight_decay"),  # passes ge=0
        ({"export": {"near_tie": float("inf")}}, "export.near_tie"),  # passes gt=0
        ({"distributed": {"launcher_config": "x.yaml", "min_gpu_memory_gib": float("inf")}}, "min_gpu_memory_gib"),
    ],
)
def test_nan_and_infinity_are_refused(overrides, field):
    with pytest.raises(ProfileError, match=rf"{field}: Input should be a finite number"):
        load_profile("cpu-smoke", overrides)


def test_yaml_nan_and_inf_in_a_profile_file_are_refused(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("extends: cpu-smoke\nname: odd\ndescription: x\ntrain:\n  learning_rate: .inf\n")
    with pytest.raises(ProfileError, match=r"odd.yaml is invalid: train.learning_rate: Input should be a finite"):
        load_profile(path)
