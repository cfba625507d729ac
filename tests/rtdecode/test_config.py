from pathlib import Path

import pytest

from rtdecode.config import ConfigError, load_config, render_config


@pytest.fixture
def env(tmp_path):
    return {"RTDECODE_HOME": str(tmp_path / "home")}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_resolve_home_from_environment(env, tmp_path):
    config, sources = load_config(environ=env)
    assert config.home == tmp_path / "home"
    assert sources.file is None
    assert config.scanner.watch_mode == "auto"
    assert config.ports.publish == 5555


def test_home_defaults_to_dot_rtdecode_in_user_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config, _ = load_config(environ={})
    assert config.home == tmp_path / ".rtdecode"


def test_file_then_overrides(env, tmp_path):
    file = write(tmp_path / "c.toml", '[scanner]\ntr_s = 2.0\nwatch_mode = "poll"\n[subject]\nid = "new01"\n')
    config, sources = load_config(file, ["scanner.tr_s=1.5", "subject.session=2"], environ=env)
    assert config.scanner.tr_s == 1.5
    assert config.scanner.watch_mode == "poll"
    assert config.subject.id == "new01" and config.subject.session == 2
    assert sources.file == file
    assert sources.overridden_keys == ("scanner.tr_s", "subject.session")


def test_config_file_found_through_environment_and_home(env, tmp_path):
    named = write(tmp_path / "named.toml", "[scanner]\ntr_s = 1.1\n")
    config, _ = load_config(environ={**env, "RTDECODE_CONFIG": str(named)})
    assert config.scanner.tr_s == 1.1
    home = Path(env["RTDECODE_HOME"])
    home.mkdir()
    write(home / "config.toml", "[scanner]\ntr_s = 0.8\n")
    config, sources = load_config(environ=env)
    assert config.scanner.tr_s == 0.8 and sources.file == home / "config.toml"


def test_missing_explicit_file_is_named(env, tmp_path):
    with pytest.raises(ConfigError, match="does not exist: .*nope.toml"):
        load_config(tmp_path / "nope.toml", environ=env)
    with pytest.raises(ConfigError, match="RTDECODE_CONFIG does not exist"):
        load_config(environ={**env, "RTDECODE_CONFIG": str(tmp_path / "gone.toml")})


def test_invalid_toml_names_the_file(env, tmp_path):
    file = write(tmp_path / "broken.toml", "[scanner\ntr_s = \n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config(file, environ=env)


def test_bad_values_name_key_rule_value_and_source(env, tmp_path):
    file = write(tmp_path / "c.toml", '[scanner]\nwatch_mode = "sometimes"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, ["scanner.tr_s=-1", "subject.id=bad id"], environ=env)
    message = str(caught.value)
    assert "scanner.tr_s: Input should be greater than 0; got -1 (from --set scanner.tr_s)" in message
    assert (
        "scanner.watch_mode: Input should be 'auto', 'inotify' or 'poll'; got 'sometimes' (from " + str(file) in message
    )
    assert "subject.id: String should match pattern" in message and "'bad id'" in message


def test_unknown_keys_and_sections_are_errors(env):
    with pytest.raises(ConfigError, match=r"scanner.tr: unknown key \(from --set scanner.tr\)"):
        load_config(overrides=["scanner.tr=1.5"], environ=env)
    with pytest.raises(ConfigError, match="scanners: unknown key"):
        load_config(overrides=["scanners.tr_s=1.5"], environ=env)


def test_ports_must_be_distinct_and_in_range(env):
    with pytest.raises(ConfigError, match="ports must be distinct"):
        load_config(overrides=["ports.snapshot=5555"], environ=env)
    with pytest.raises(ConfigError, match="ports.decoder: Input should be less than or equal to 65535; got 70000"):
        load_config(overrides=["ports.decoder=70000"], environ=env)


@pytest.mark.parametrize("item", ["scanner..tr_s=1", "=3", "scanner.tr_s"])
def test_malformed_overrides(env, item):
    with pytest.raises(ConfigError, match="override must look like 'section.key=value'"):
        load_config(overrides=[item], environ=env)


def test_override_value_types(env):
    config, _ = load_config(overrides=["scanner.ignore=['*.log']", "subject.id=new01", "scanner.tr_s=2"], environ=env)
    assert config.scanner.ignore == ("*.log",)
    assert config.subject.id == "new01"
    assert config.scanner.tr_s == 2.0


def test_rendered_config_reads_back_equal(env, tmp_path):
    config, sources = load_config(overrides=["scanner.tr_s=1.5", "subject.id=new01"], environ=env)
    text = render_config(config, sources)
    assert "# overridden on the command line: scanner.tr_s, subject.id" in text
    assert "# watch_dir = (unset)" in text
    again, _ = load_config(write(tmp_path / "shown.toml", text), environ=env)
    assert again == config


def test_ignore_patterns():
    config, _ = load_config(environ={"RTDECODE_HOME": "/tmp/x"})
    assert config.scanner.ignores(".hidden.dcm")
    assert config.scanner.ignores("vol_001.json")
    assert not config.scanner.ignores("001_000001_000001.dcm")


def test_paths_expand_the_user_folder(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config, _ = load_config(overrides=['paths.watch_dir="~/scanner"'], environ=env)
    assert config.paths.watch_dir == tmp_path / "scanner"


def test_subject_id_with_a_newline_is_refused(env):
    with pytest.raises(ConfigError, match="subject.id: String should match pattern"):
        load_config(overrides=['subject.id="new01\\n"'], environ=env)
