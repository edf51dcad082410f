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
