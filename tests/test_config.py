import pytest

from stepaudio.config import DEFAULT_CONFIG, load_config
from stepaudio.errors import ConfigError


def test_default_profile_is_tiny_on_cpu():
    cfg = load_config(None)
    assert DEFAULT_CONFIG.is_file()
    assert cfg.models.profile == "tiny" and cfg.tokenizer.device == "cpu"


@pytest.mark.parametrize(
    "text, key",
    [
        ("server:\n  prot: 80\n", "server.prot: unknown key"),
        ("server:\n  port: 70000\n", "server.port"),
        ("tokenizer:\n  semantic_step_ms: 100\n", "tokenizer.semantic_step_ms"),
        ("modles: {}\n", "modles: unknown key"),
        ("models:\n  profile: huge\n", "models.profile"),
    ],
)
def test_a_bad_key_or_value_gives_one_line_naming_it(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_broken_yaml_and_missing_file_are_clear(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("server: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_real_profile_needs_a_root():
    from stepaudio.config import config_from_dict

    cfg = config_from_dict({"models": {"profile": "real"}})
    with pytest.raises(ConfigError, match="models.root"):
        cfg.models.resolved_root()


def test_unquoted_on_and_off_in_yaml_mean_the_words(tmp_path):
    from stepaudio.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("llm:\n  fast_decode: off\ntts:\n  batching: on\n", encoding="utf-8")
    cfg = load_config(path)  # YAML 1.1 reads these as booleans
    assert cfg.llm.fast_decode == "off" and cfg.tts.batching == "on"


def test_streaming_defaults_to_cosyvoices_recipe_for_the_real_checkpoints_only():
    from stepaudio.config import config_from_dict

    real = config_from_dict({"models": {"profile": "real", "root": "/srv/x"}})
    assert real.tts.streaming == "auto" and real.tts.streaming_mode("real") == "cosyvoice"
    assert load_config(None).tts.streaming_mode("tiny") == "low-latency"
    assert real.tts.streaming_mode("random") == "low-latency"
    chosen = config_from_dict({"tts": {"streaming": "low-latency"}})
    assert chosen.tts.streaming_mode("real") == "low-latency"
    with pytest.raises(ConfigError, match="tts.streaming"):
        config_from_dict({"tts": {"streaming": "fast"}})
