"""cryptobot.config: defaults, .env parsing, precedence, ceilings, one-line errors, secrets, .env permissions."""
import dataclasses
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cryptobot.config import (LIMITS, SETTINGS_KEYS, ConfigError, Secret, Settings,
                              load_settings)

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "AKfake-DISTINCTIVE-key-7f3c9e1d"
FAKE_SECRET = "SKfake-DISTINCTIVE-secret-0b5a2c4e"


def write_env(tmp_path, text, mode=0o600):
    p = tmp_path / ".env"
    p.write_text(text)
    p.chmod(mode)
    return p


# ---------------------------------------------------------------------------------------------------- defaults
def test_defaults():
    s = load_settings({}, dotenv_path=None)
    assert s == Settings()
    assert (s.stop_loss_pct, s.risk_pct, s.leverage, s.min_balance_usd) == (1.5, 1.0, 1.0, 100.0)
    assert (s.max_data_age_s, s.kill_switch_losses, s.symbol, s.timeframe) == (300, 3, "BTC/USDT", "1h")
    assert (s.state_dir, s.data_dir, s.reports_dir) == (Path("var"), Path("data"), Path("reports"))
    assert (s.fee_pct, s.slippage_pct, s.stop_limit_buffer_pct) == (0.1, 0.05, 0.5)
    assert (s.go_live, s.testnet, s.api_key, s.api_secret, s.exchange_url) == (False, False, None, None, None)
    assert s.mode == "paper" and s.warnings == ()
    assert isinstance(s.max_data_age_s, int) and isinstance(s.kill_switch_losses, int)


def test_missing_dotenv_file_means_defaults(tmp_path):
    assert load_settings({}, tmp_path / "absent.env") == Settings()


def test_env_example_documents_every_key_and_loads_to_the_defaults(tmp_path):
    text = (ROOT / ".env.example").read_text()
    keys = re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.M)
    assert [k for k, _ in keys] and set(k for k, _ in keys) == set(SETTINGS_KEYS)
    for key, value in keys:                      # the documented default is the code's default
        name, kind, default, _ = SETTINGS_KEYS[key]
        assert value == default or (kind == "path" and Path(value) == Path(default)) or \
            (kind == "float" and float(value) == float(default)), key
        if name in LIMITS:                        # and the documented range is the code's range
            lim = LIMITS[name]
            block = text[:text.index(f"\n{key}=")].rsplit("\n", 1)[-1]
            assert f"{lim.lo:g}..".replace("1e+09", "1000000000") in block.replace("1000000000", "1e+09") or \
                f"{lim.lo:g}..{lim.hi:g}" in block or f"{lim.lo:g}..{int(lim.hi)}" in block, (key, block)
    assert "DISTINCTIVE" not in text and not re.search(r"^BINANCE_API_(KEY|SECRET)=\S", text, flags=re.M)
    p = tmp_path / ".env"
    p.write_text(text)
    p.chmod(0o600)
    assert load_settings({}, p) == Settings()


# ---------------------------------------------------------------------------------------------------- .env parsing
def test_dotenv_parsing_and_env_precedence(tmp_path):
    p = write_env(tmp_path, "# comment\n\nexport CRYPTOBOT_RISK_PCT=0.5\nCRYPTOBOT_STOP_LOSS_PCT = 2.5  # inline\n"
                            "CRYPTOBOT_SYMBOL='ETH/USDC'\nCRYPTOBOT_STATE_DIR=\"/srv/state dir\"\nGO_LIVE=False\n"
                            f"BINANCE_API_KEY={FAKE_KEY}\nCRYPTOBOT_MAX_DATA_AGE_S=600\n")
    before = dict(os.environ)
    s = load_settings({"CRYPTOBOT_MAX_DATA_AGE_S": "120", "GO_LIVE": "TRUE"}, p)
    assert dict(os.environ) == before                                   # os.environ untouched
    assert s.risk_pct == 0.5 and s.stop_loss_pct == 2.5 and s.symbol == "ETH/USDC"
    assert s.state_dir == Path("/srv/state dir") and s.max_data_age_s == 120 and s.go_live and s.mode == "live"
    assert s.api_key.reveal() == FAKE_KEY
    # an empty environment value unsets an optional key from .env
    assert load_settings({"BINANCE_API_KEY": ""}, p).api_key is None


def test_env_none_reads_os_environ(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYPTOBOT_KILL_SWITCH_LOSSES", "5")
    monkeypatch.chdir(tmp_path)                                          # default dotenv_path=".env" is absent here
    assert load_settings().kill_switch_losses == 5


def test_no_interpolation(tmp_path):
    p = write_env(tmp_path, "BINANCE_API_SECRET=ab${HOME}cd\n")
    assert load_settings({}, p).api_secret.reveal() == "ab${HOME}cd"


@pytest.mark.parametrize("text,fragment", [
    ("CRYPTOBOT_RISK_PCT=1\nCRYPTOBOT_RISK_PCT=1.5\n", "CRYPTOBOT_RISK_PCT appears twice"),
    ("CRYPTOBOT_RISK_PCT=1\n'unterminated=" + FAKE_SECRET + "\n", "line 2: not a KEY=value line"),
    ("STOP_LOSS_PCT=3\n", "STOP_LOSS_PCT in"),
    ("go_live=true\n", "(did you mean GO_LIVE?)"),
])
def test_dotenv_file_problems(tmp_path, text, fragment):
    p = write_env(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_settings({}, p)
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg and "DISTINCTIVE" not in msg, msg


def test_process_env_keys_allowed_in_environment_only(tmp_path):
    s = load_settings({"CRYPTOBOT_DEBUG": "1", "CRYPTOBOT_WORKFLOWS": "/x", "CRYPTOBOT_SHARED_DATA": "/y"}, None)
    assert s == Settings()
    p = write_env(tmp_path, "CRYPTOBOT_DEBUG=1\n")
    with pytest.raises(ConfigError, match="read from the process environment only"):
        load_settings({}, p)


def test_dotenv_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings({}, tmp_path)


def test_error_names_where_to_fix(tmp_path):
    p = write_env(tmp_path, "CRYPTOBOT_RISK_PCT=3\n")
    with pytest.raises(ConfigError, match=re.escape(f"fix it in {p}")):
        load_settings({}, p)
    with pytest.raises(ConfigError, match="fix it in the environment"):
        load_settings({"CRYPTOBOT_RISK_PCT": "3"}, None)


# ---------------------------------------------------------------------------------------------------- bad settings
BAD = [  # (env, key, fragment of the allowed range / hint)
    ({"CRYPTOBOT_RISK_PCT": "5"}, "CRYPTOBOT_RISK_PCT", "outside the allowed range 0.01..2 (percent of equity"),
    ({"CRYPTOBOT_RISK_PCT": "1,5"}, "CRYPTOBOT_RISK_PCT", "is not a plain decimal number"),
    ({"CRYPTOBOT_RISK_PCT": "1.5%"}, "CRYPTOBOT_RISK_PCT", "is not a plain decimal number"),
    ({"CRYPTOBOT_RISK_PCT": ""}, "CRYPTOBOT_RISK_PCT", "is empty"),
    ({"CRYPTOBOT_RISK_PCT": "0"}, "CRYPTOBOT_RISK_PCT", "0.01..2"),
    ({"CRYPTOBOT_STOP_LOSS_PCT": "abc"}, "CRYPTOBOT_STOP_LOSS_PCT", "0.2..10"),
    ({"CRYPTOBOT_STOP_LOSS_PCT": "nan"}, "CRYPTOBOT_STOP_LOSS_PCT", "0.2..10"),
    ({"CRYPTOBOT_STOP_LOSS_PCT": "0.1"}, "CRYPTOBOT_STOP_LOSS_PCT", "0.2..10"),
    ({"CRYPTOBOT_STOP_LOSS_PCT": "12"}, "CRYPTOBOT_STOP_LOSS_PCT", "0.2..10"),
    ({"CRYPTOBOT_LEVERAGE": "inf"}, "CRYPTOBOT_LEVERAGE", "0.1..1"),
    ({"CRYPTOBOT_LEVERAGE": "2"}, "CRYPTOBOT_LEVERAGE", "0.1..1"),
    ({"CRYPTOBOT_LEVERAGE": "1e400"}, "CRYPTOBOT_LEVERAGE", "0.1..1"),
    ({"CRYPTOBOT_MIN_BALANCE_USD": "50"}, "CRYPTOBOT_MIN_BALANCE_USD", "100..1e+09"),
    ({"CRYPTOBOT_MIN_BALANCE_USD": "1_000"}, "CRYPTOBOT_MIN_BALANCE_USD", "plain decimal"),
    ({"CRYPTOBOT_MAX_DATA_AGE_S": "10"}, "CRYPTOBOT_MAX_DATA_AGE_S", "30..3600"),
    ({"CRYPTOBOT_MAX_DATA_AGE_S": "7200"}, "CRYPTOBOT_MAX_DATA_AGE_S", "30..3600"),
    ({"CRYPTOBOT_MAX_DATA_AGE_S": "300.5"}, "CRYPTOBOT_MAX_DATA_AGE_S", "whole number"),
    ({"CRYPTOBOT_KILL_SWITCH_LOSSES": "0"}, "CRYPTOBOT_KILL_SWITCH_LOSSES", "1..10"),
    ({"CRYPTOBOT_KILL_SWITCH_LOSSES": "11"}, "CRYPTOBOT_KILL_SWITCH_LOSSES", "1..10"),
    ({"CRYPTOBOT_KILL_SWITCH_LOSSES": "three"}, "CRYPTOBOT_KILL_SWITCH_LOSSES", "whole number"),
    ({"CRYPTOBOT_FEE_PCT": "1.5"}, "CRYPTOBOT_FEE_PCT", "0..1"),
    ({"CRYPTOBOT_FEE_PCT": "-0.1"}, "CRYPTOBOT_FEE_PCT", "0..1"),
    ({"CRYPTOBOT_SLIPPAGE_PCT": "3"}, "CRYPTOBOT_SLIPPAGE_PCT", "0..2"),
    ({"CRYPTOBOT_STOP_LIMIT_BUFFER_PCT": "0"}, "CRYPTOBOT_STOP_LIMIT_BUFFER_PCT", "0.05..5"),
    ({"CRYPTOBOT_PAPER_BALANCE_USD": "10"}, "CRYPTOBOT_PAPER_BALANCE_USD", "100..1e+09"),
    ({"GO_LIVE": "yes please"}, "GO_LIVE", "is not a boolean (use true or false)"),
    ({"BINANCE_TESTNET": "maybe"}, "BINANCE_TESTNET", "is not a boolean"),
    ({"GO_LIVE": ""}, "GO_LIVE", "is empty"),
    ({"CRYPTOBOT_TIMEFRAME": "2h"}, "CRYPTOBOT_TIMEFRAME", "1m, 5m, 15m, 1h, 4h, 1d"),
    ({"CRYPTOBOT_SYMBOL": "BTCUSDT"}, "CRYPTOBOT_SYMBOL", "BASE/QUOTE"),
    ({"CRYPTOBOT_SYMBOL": "btc/usdt"}, "CRYPTOBOT_SYMBOL", "upper-case"),
    ({"CRYPTOBOT_SYMBOL": "ETH/BTC"}, "CRYPTOBOT_SYMBOL", "USD quote"),
    ({"CRYPTOBOT_MODE": "prod"}, "CRYPTOBOT_MODE", "paper, testnet, live"),
    ({"CRYPTOBOT_MODE": "live"}, "CRYPTOBOT_MODE", "give mode paper"),
    ({"CRYPTOBOT_MODE": "paper", "GO_LIVE": "true"}, "CRYPTOBOT_MODE", "give mode live"),
    ({"GO_LIVE": "true", "BINANCE_TESTNET": "true"}, "GO_LIVE", "contradict"),
    ({"BINANCE_TESTNET": "1", "CRYPTOBOT_EXCHANGE_URL": "http://127.0.0.1:8765"}, "BINANCE_TESTNET", "contradict"),
    ({"CRYPTOBOT_EXCHANGE_URL": "https://api.binance.com"}, "CRYPTOBOT_EXCHANGE_URL", "http://127.0.0.1:PORT"),
    ({"CRYPTOBOT_EXCHANGE_URL": "http://10.0.0.5:8765"}, "CRYPTOBOT_EXCHANGE_URL", "loopback"),
    ({"CRYPTOBOT_EXCHANGE_URL": "http://127.0.0.1"}, "CRYPTOBOT_EXCHANGE_URL", "loopback"),
    ({"CRYPTOBOT_EXCHANGE_URL": "http://127.0.0.1:8765/api?x=1"}, "CRYPTOBOT_EXCHANGE_URL", "loopback"),
    ({"CRYPTOBOT_EXCHANGE_URL": "http://127.0.0.1:99999"}, "CRYPTOBOT_EXCHANGE_URL", "not a valid URL"),
    ({"CRYPTOBOT_LOG_LEVEL": "LOUD"}, "CRYPTOBOT_LOG_LEVEL", "DEBUG, INFO"),
    ({"CRYPTOBOT_STATE_DIR": "  "}, "CRYPTOBOT_STATE_DIR", "is empty"),
    ({"CRYPTOBOT_RISK_PC": "1"}, "CRYPTOBOT_RISK_PC", "did you mean CRYPTOBOT_RISK_PCT?"),
    ({"CRYPTOBOT_STOPLOSS_PCT": "1"}, "CRYPTOBOT_STOPLOSS_PCT", "did you mean CRYPTOBOT_STOP_LOSS_PCT?"),
    ({"cryptobot_go_live": "true"}, "cryptobot_go_live", "(did you mean GO_LIVE?)"),
    ({"CRYPTOBOT_APIKEY": "x"}, "CRYPTOBOT_APIKEY", "(did you mean BINANCE_API_KEY?)"),
    ({"CRYPTOBOT_RISK_PCT": "１.０"}, "CRYPTOBOT_RISK_PCT", "not a plain decimal number"),        # full-width
    ({"CRYPTOBOT_RISK_PCT": "٠.٥"}, "CRYPTOBOT_RISK_PCT", "not a plain decimal number"),          # Arabic-Indic
    ({"CRYPTOBOT_LEVERAGE": "1.٠"}, "CRYPTOBOT_LEVERAGE", "not a plain decimal number"),
    ({"CRYPTOBOT_MAX_DATA_AGE_S": "１２０"}, "CRYPTOBOT_MAX_DATA_AGE_S", "not a whole number"),
    ({"CRYPTOBOT_KILL_SWITCH_LOSSES": "৩"}, "CRYPTOBOT_KILL_SWITCH_LOSSES", "not a whole number"),   # Bengali 3
    ({"GO_LIVE": "t"}, "GO_LIVE", "is not a boolean"),                                # pydantic alone would take these
    ({"BINANCE_TESTNET": "y"}, "BINANCE_TESTNET", "is not a boolean"),
    ({"CRYPTOBOT_STOP_ORDER": "stop"}, "CRYPTOBOT_STOP_ORDER", "is not a stop order type (allowed: auto, market, limit)"),
    ({"CRYPTOBOT_STOP_ORDER": ""}, "CRYPTOBOT_STOP_ORDER", "is empty"),
    ({"CRYPTOBOT_STOP_CHECK_S": "4"}, "CRYPTOBOT_STOP_CHECK_S", "outside the allowed range 5..300"),
    ({"CRYPTOBOT_STOP_CHECK_S": "301"}, "CRYPTOBOT_STOP_CHECK_S", "outside the allowed range 5..300"),
    ({"CRYPTOBOT_STOP_CHECK_S": "60.5"}, "CRYPTOBOT_STOP_CHECK_S", "not a whole number"),
    ({"CRYPTOBOT_STOP_CHECK_S": "６０"}, "CRYPTOBOT_STOP_CHECK_S", "not a whole number"),
]


@pytest.mark.parametrize("env,key,fragment", BAD, ids=[f"{k}={list(e.values())[-1]!r}" for e, k, _ in BAD])
def test_bad_setting_is_one_clear_line(env, key, fragment):
    with pytest.raises(ConfigError) as ei:
        load_settings(env, dotenv_path=None)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg and len(msg) < 400, msg
    assert msg.startswith(key) and ei.value.key == key, msg
    assert fragment in msg, msg
    value = env.get(key)
    if value and value.strip() and key != "CRYPTOBOT_EXCHANGE_URL" and "not a cryptobot setting" not in msg:
        assert value in msg                                          # the offending value is shown


def test_range_message_matches_the_documented_form():
    with pytest.raises(ConfigError) as ei:
        load_settings({"CRYPTOBOT_RISK_PCT": "5"}, None)
    assert str(ei.value) == ("CRYPTOBOT_RISK_PCT=5 is outside the allowed range 0.01..2 (percent of equity risked per "
                             "trade); fix it in the environment (it overrides .env)")


def test_several_problems_still_one_line():
    with pytest.raises(ConfigError) as ei:
        load_settings({"CRYPTOBOT_RISK_PCT": "5", "GO_LIVE": "maybe", "CRYPTOBOT_RISK_PC": "1"}, None)
    msg = str(ei.value)
    assert "\n" not in msg and "and 2 more" in msg and "GO_LIVE" in msg and "CRYPTOBOT_RISK_PCT" in msg


@pytest.mark.parametrize("env", [{"CRYPTOBOT_RISK_PCT": "2"}, {"CRYPTOBOT_RISK_PCT": "0.01"},
                                 {"CRYPTOBOT_STOP_LOSS_PCT": "10"}, {"CRYPTOBOT_STOP_LOSS_PCT": "0.2"},
                                 {"CRYPTOBOT_KILL_SWITCH_LOSSES": "10"}, {"CRYPTOBOT_MAX_DATA_AGE_S": "3600"},
                                 {"CRYPTOBOT_MIN_BALANCE_USD": "100"}, {"CRYPTOBOT_MIN_BALANCE_USD": "5000"},
                                 {"CRYPTOBOT_FEE_PCT": "0"}, {"CRYPTOBOT_SLIPPAGE_PCT": "2"},
                                 {"GO_LIVE": "off", "BINANCE_TESTNET": "Yes"}, {"CRYPTOBOT_LEVERAGE": "0.5"},
                                 {"CRYPTOBOT_EXCHANGE_URL": "http://localhost:8765/"}, {"CRYPTOBOT_RISK_PCT": "1.5"}])
def test_values_on_the_ceilings_are_accepted(env):
    s = load_settings(env, None)
    assert isinstance(s, Settings)


def test_settings_constructor_enforces_the_same_ceilings():
    for kw in (dict(risk_pct=2.5), dict(leverage=1.5), dict(stop_loss_pct=0.1), dict(kill_switch_losses=0),
               dict(max_data_age_s=5), dict(min_balance_usd=99.99), dict(fee_pct=2.0), dict(slippage_pct=5.0),
               dict(max_data_age_s=300.5), dict(risk_pct=float("nan")), dict(go_live="true"), dict(timeframe="2h")):
        with pytest.raises(ConfigError):
            Settings(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().risk_pct = 5


# ---------------------------------------------------------------------------------------------------- mode
def test_modes_and_live_blockers():
    assert load_settings({}, None).mode == "paper"
    assert load_settings({"BINANCE_TESTNET": "true", "CRYPTOBOT_MODE": "testnet"}, None).mode == "testnet"
    s = load_settings({"GO_LIVE": "true", "CRYPTOBOT_MODE": "live"}, None)
    assert s.mode == "live" and s.live_blockers() == ["BINANCE_API_KEY is not set", "BINANCE_API_SECRET is not set"]
    s = load_settings({"GO_LIVE": "true", "BINANCE_API_KEY": FAKE_KEY, "BINANCE_API_SECRET": FAKE_SECRET}, None)
    assert s.live_blockers() == [] and "live blocker" not in s.summary()
    assert "live blocker: BINANCE_API_KEY is not set" in load_settings({"GO_LIVE": "true"}, None).summary()
    paper = load_settings({"BINANCE_API_KEY": FAKE_KEY, "BINANCE_API_SECRET": FAKE_SECRET}, None)
    assert paper.mode == "paper" and paper.live_blockers() == ["GO_LIVE is not true (paper trading is the default)"]
    emu = load_settings({"GO_LIVE": "true", "CRYPTOBOT_EXCHANGE_URL": "http://127.0.0.1:8765/"}, None)
    assert emu.exchange_url == "http://127.0.0.1:8765" and emu.mode == "live"


# ---------------------------------------------------------------------------------------------------- secrets
def _all_text(s: Settings) -> str:
    return "|".join([repr(s), str(s), f"{s}", str(dataclasses.asdict(s)), repr(dataclasses.astuple(s)),
                     str(s.public_dict()), s.summary(), repr(s.api_key), str(s.api_secret)])


def test_notify_urls_are_a_secret_masked_everywhere(tmp_path):
    "CRYPTOBOT_NOTIFY_URLS carries tokens: Secret in repr, scheme and host only in public_dict/summary; empty = off."
    tok = "DISTINCTIVE-bot-token-99"
    p = write_env(tmp_path, f"CRYPTOBOT_NOTIFY_URLS=json://127.0.0.1:8080/{tok}, tgram://12345:{tok}/77\n")
    s = load_settings({}, p)
    assert s.notify_urls.reveal() == f"json://127.0.0.1:8080/{tok}, tgram://12345:{tok}/77"
    text = _all_text(s) + repr(s.notify_urls)
    assert "DISTINCTIVE" not in text and "Secret('****')" in text
    assert s.public_dict()["notify_urls"] == "json://127.0.0.1:****,tgram://****"
    assert "CRYPTOBOT_NOTIFY_URLS=json://127.0.0.1:****,tgram://****" in s.summary().splitlines()
    assert load_settings({"CRYPTOBOT_NOTIFY_URLS": ""}, None).notify_urls is None
    with pytest.raises(ConfigError) as e:
        load_settings({"CRYPTOBOT_NOTIFY_URLS": f"json://h/{tok}\x07"}, None)
    assert "CRYPTOBOT_NOTIFY_URLS" in str(e.value) and "DISTINCTIVE" not in str(e.value)


def test_secret_never_printed(tmp_path):
    p = write_env(tmp_path, f"BINANCE_API_SECRET={FAKE_SECRET}\n")
    s = load_settings({"BINANCE_API_KEY": FAKE_KEY}, p)
    assert s.api_key.reveal() == FAKE_KEY and s.api_secret.reveal() == FAKE_SECRET
    text = _all_text(s)
    assert "DISTINCTIVE" not in text and "Secret('****')" in text
    assert s.public_dict()["api_key"] == "****" and s.public_dict()["api_secret"] == "****"
    with pytest.raises(TypeError):
        pickle.dumps(s)


@pytest.mark.parametrize("env", [
    {"BINANCE_API_KEY": FAKE_KEY + " trailing", "BINANCE_API_SECRET": FAKE_SECRET},
    {"BINANCE_API_KEY": FAKE_KEY, "BINANCE_API_SECRET": FAKE_SECRET + "\n"},
    {"BINANCE_API_KEY": FAKE_KEY, "BINANCE_API_SECRET": FAKE_SECRET, "CRYPTOBOT_RISK_PCT": "9"},
    {"BINANCE_API_KEY": FAKE_KEY, "BINANCE_API_SECRET": FAKE_SECRET, "GO_LIVE": "true", "BINANCE_TESTNET": "true"},
    {"BINANCE_API_KEY": FAKE_KEY, "CRYPTOBOT_EXCHANGE_URL": f"http://{FAKE_SECRET}@127.0.0.1:8765"},
])
def test_secret_never_in_exception_text(env):
    with pytest.raises(ConfigError) as ei:
        load_settings(env, None)
    text = str(ei.value) + repr(ei.value) + repr(ei.value.args)
    assert "DISTINCTIVE" not in text and "\n" not in str(ei.value)


def test_secret_type():
    s = Secret(FAKE_KEY)
    assert repr(s) == str(s) == f"{s}" == f"{s!r}" == "Secret('****')" and s.reveal() == FAKE_KEY
    assert s == Secret(FAKE_KEY) and s != Secret("other") and s != FAKE_KEY and bool(s)
    with pytest.raises(AttributeError):
        s._value = "x"


# ---------------------------------------------------------------------------------------------------- permissions
def test_group_readable_dotenv_warns(tmp_path, caplog):
    p = write_env(tmp_path, f"BINANCE_API_KEY={FAKE_KEY}\nBINANCE_API_SECRET={FAKE_SECRET}\nGO_LIVE=true\n", mode=0o644)
    with caplog.at_level("WARNING", logger="cryptobot.config"):
        s = load_settings({}, p)
    logged = [r.getMessage() for r in caplog.records if r.name == "cryptobot.config"]
    assert len(logged) == 1 and f"chmod 600 {p}" in logged[0] and "DISTINCTIVE" not in logged[0]
    assert len(s.warnings) == 1 and "mode 644" in s.warnings[0] and "DISTINCTIVE" not in s.warnings[0]
    assert any("chmod 600" in b for b in s.live_blockers())                 # keys in an exposed file block live
    assert "warning:" in s.summary()


def test_dotenv_permission_warning_is_one_stderr_line(tmp_path):
    "Printed once per process as one line, with no source-code line (a warnings.warn would add one)."
    write_env(tmp_path, "CRYPTOBOT_RISK_PCT=0.5\n", mode=0o640)
    code = "from cryptobot.config import load_settings; load_settings(); load_settings(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("warning: .env is accessible"), r.stderr
    assert "chmod 600 .env" in r.stderr and "load_settings" not in r.stderr


def test_private_dotenv_is_quiet(tmp_path, caplog):
    p = write_env(tmp_path, f"BINANCE_API_KEY={FAKE_KEY}\nBINANCE_API_SECRET={FAKE_SECRET}\nGO_LIVE=true\n", mode=0o600)
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="cryptobot.config"):
        warnings.simplefilter("error")
        s = load_settings({}, p)
    assert s.warnings == () and s.live_blockers() == [] and caplog.records == []


# ---------------------------------------------------------------------------------------------------- subprocess
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not (k.upper().startswith(("CRYPTOBOT_", "BINANCE_")) or k.upper() == "GO_LIVE")}
    env.update(extra)
    return env


@pytest.mark.parametrize("extra,start", [
    ({"CRYPTOBOT_RISK_PCT": "5"}, "CRYPTOBOT_RISK_PCT=5 is outside the allowed range 0.01..2"),
    ({"CRYPTOBOT_LEVERAGE": "1,5"}, "CRYPTOBOT_LEVERAGE=1,5 is not a plain decimal number"),
    ({"GO_LIVE": "yes please"}, "GO_LIVE='yes please' is not a boolean"),
    ({"CRYPTOBOT_KILL_SWTICH_LOSSES": "3"}, "CRYPTOBOT_KILL_SWTICH_LOSSES in the environment is not a cryptobot setting"),
    ({"BINANCE_API_SECRET": FAKE_SECRET + " x"}, "BINANCE_API_SECRET is empty or contains spaces"),
])
def test_error_reaches_stderr_as_one_line(tmp_path, extra, start):
    # exactly the brief's command: the traceback's last line carries the whole message
    r = subprocess.run([sys.executable, "-c", "from cryptobot.config import load_settings; load_settings()"],
                       cwd=tmp_path, env=_clean_env(**extra), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DISTINCTIVE" not in r.stderr + r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cryptobot.config.ConfigError: " + start), r.stderr
    # and as the CLI will print it: str(exc) only, one line on stderr
    cli = ("import sys\nfrom cryptobot.config import load_settings, ConfigError\n"
           "try:\n    load_settings()\nexcept ConfigError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", cli], cwd=tmp_path, env=_clean_env(**extra),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith(start), r.stderr


def test_subprocess_reads_dotenv_in_cwd(tmp_path):
    write_env(tmp_path, "CRYPTOBOT_RISK_PCT=0.25\nCRYPTOBOT_SYMBOL=SOL/USDT\n")
    code = "from cryptobot.config import load_settings; s = load_settings(); print(s.risk_pct, s.symbol, s.mode)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["0.25", "SOL/USDT", "paper"], r.stderr


def test_config_import_is_lean():
    code = ("import sys, cryptobot.config, cryptobot.risk\n"
            "heavy = [m for m in ('ccxt', 'pandas', 'numpy', 'vectorbt', 'plotly', 'matplotlib', 'papermill', 'dotenv')"
            " if m in sys.modules]\nprint(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------- pydantic (issue 10)
def test_stop_order_and_stop_check_s():
    s = load_settings({}, None)
    assert (s.stop_order, s.stop_check_s) == ("auto", 60) and isinstance(s.stop_check_s, int)
    s = load_settings({"CRYPTOBOT_STOP_ORDER": " limit ", "CRYPTOBOT_STOP_CHECK_S": "300"}, None)
    assert (s.stop_order, s.stop_check_s) == ("limit", 300)
    assert load_settings({"CRYPTOBOT_STOP_ORDER": "market", "CRYPTOBOT_STOP_CHECK_S": "5"}, None).stop_check_s == 5
    assert "CRYPTOBOT_STOP_ORDER=limit" in s.summary() and s.public_dict()["stop_check_s"] == 300
    for kw in (dict(stop_check_s=4), dict(stop_check_s=301), dict(stop_check_s=60.5), dict(stop_order="Market")):
        with pytest.raises(ConfigError):
            Settings(**kw)
    assert LIMITS["stop_check_s"].text == "5..300" and SETTINGS_KEYS["CRYPTOBOT_STOP_ORDER"][0] == "stop_order"


def test_fields_are_pydantic_with_the_ceilings_as_bounds():
    "The bounds live on the pydantic fields, taken from LIMITS; the env reader is a pydantic-settings BaseSettings."
    from pydantic import SecretStr
    from pydantic_settings import BaseSettings
    from cryptobot.config import _env_model
    for name, lim in LIMITS.items():
        meta = {type(m).__name__: m for m in Settings.__pydantic_fields__[name].metadata}
        assert (meta["Ge"].ge, meta["Le"].le) == (lim.lo, lim.hi), name
    assert issubclass(_env_model(), BaseSettings)
    s = load_settings({"BINANCE_API_KEY": FAKE_KEY}, None)
    assert isinstance(s.api_key, SecretStr) and isinstance(s.api_key, Secret) and s.api_key.get_secret_value() == FAKE_KEY
    # strict: text, booleans and non-ASCII digits are not numbers for the constructor (only load_settings reads text)
    for kw in (dict(risk_pct="1"), dict(risk_pct="１.０"), dict(leverage=True), dict(max_data_age_s="300")):
        with pytest.raises(ConfigError):
            Settings(**kw)
    # a whole float is still a count, and replace() re-validates and raises ConfigError, one line
    assert Settings(max_data_age_s=120.0).max_data_age_s == 120
    with pytest.raises(ConfigError) as ei:
        dataclasses.replace(Settings(), risk_pct=3.0, api_key=FAKE_KEY + " x")
    assert "\n" not in str(ei.value) and "DISTINCTIVE" not in str(ei.value) + repr(ei.value.__cause__)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__      # pydantic's text (with inputs) not chained


def test_pydantic_settings_debug_log_masks_secrets(tmp_path):
    "PYDANTIC_SETTINGS_DEBUG logs every source's values: the keys must reach it as Secret('****') only."
    write_env(tmp_path, f"BINANCE_API_SECRET={FAKE_SECRET}\n")
    code = ("import logging; logging.basicConfig(level=logging.DEBUG)\n"
            "from cryptobot.config import load_settings; s = load_settings(); print(s.api_key.reveal() == "
            f"{FAKE_KEY!r}, s.api_secret.reveal() == {FAKE_SECRET!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=_clean_env(PYDANTIC_SETTINGS_DEBUG="1", BINANCE_API_KEY=FAKE_KEY))
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr
    assert "Resolving settings" in r.stderr and "Secret('****')" in r.stderr, r.stderr     # the debug log ran
    assert "DISTINCTIVE" not in r.stderr + r.stdout


def test_pydantic_is_a_declared_dependency_at_the_installed_version():
    import tomllib
    from importlib.metadata import version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pkg in ("pydantic", "pydantic-settings"):
        spec = next(d for d in deps if re.fullmatch(rf"{pkg}>=[0-9.]+", d))
        lower = tuple(int(x) for x in spec.split(">=")[1].split("."))
        assert tuple(int(x) for x in version(pkg).split(".")[:len(lower)]) >= lower, (pkg, version(pkg))


def test_strategy_and_its_parameters():
    s = load_settings({}, None)
    assert (s.strategy, s.strategy_params) == ("model", None)
    s = load_settings({"CRYPTOBOT_STRATEGY": "ema_cross", "CRYPTOBOT_STRATEGY_PARAMS": "fast=12,slow=26"}, None)
    assert (s.strategy, s.strategy_params) == ("ema_cross", "fast=12,slow=26")
    assert load_settings({"CRYPTOBOT_STRATEGY": "my_pkg.rules:Breakout"}, None).strategy == "my_pkg.rules:Breakout"
    for kw in (dict(strategy="EMA cross"), dict(strategy="mod:"), dict(strategy_params="fast 12"),
               dict(strategy_params="fast=12,,slow=3")):
        with pytest.raises(ConfigError):
            Settings(**kw)
    assert SETTINGS_KEYS["CRYPTOBOT_STRATEGY"][0] == "strategy" and "CRYPTOBOT_STRATEGY_PARAMS=" in s.summary()


# ---------------------------------------------------------------------------------------------------- several symbols
def test_symbol_and_symbols_both_set_and_different_exit_78_in_one_line(tmp_path):
    env = _clean_env(CRYPTOBOT_SYMBOL="BTC/USDT", CRYPTOBOT_SYMBOLS="BTC/USDT,ETH/USDT")
    r = subprocess.run([str(Path(sys.executable).parent / "cryptobot"), "config"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 78, r
    assert r.stderr.count("\n") == 1 and "CRYPTOBOT_SYMBOL=BTC/USDT and CRYPTOBOT_SYMBOLS=BTC/USDT,ETH/USDT are both set " \
        "and differ" in r.stderr, r.stderr
    s = load_settings({"CRYPTOBOT_SYMBOLS": "ETH/USDT,SOL/USDT,BTC/USDT"}, None)
    assert (s.symbol, s.symbols, s.max_open_positions, s.max_total_risk_pct) == \
        ("ETH/USDT", ("ETH/USDT", "SOL/USDT", "BTC/USDT"), 3, 3.0)


@pytest.mark.parametrize("key,value,msg", [
    ("CRYPTOBOT_MAX_OPEN_POSITIONS", "11", "outside the allowed range 1..10"),
    ("CRYPTOBOT_MAX_TOTAL_RISK_PCT", "5.01", "outside the allowed range 0.01..5"),
    ("CRYPTOBOT_SYMBOLS", "BTC/USDT,ETH/USDC", "mixes quote currencies"),
])
def test_portfolio_settings_have_ceilings(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load_settings({key: value}, None)


def test_replace_symbol_on_single_symbol_settings_keeps_working():
    s = dataclasses.replace(Settings(), symbol="ETH/USDT")          # as the monitor, parity and tests do
    assert (s.symbol, s.symbols) == ("ETH/USDT", ("ETH/USDT",))
    m = Settings(symbols=("BTC/USDT", "ETH/USDT"))
    assert dataclasses.replace(m, symbol="ETH/USDT").symbols == ("BTC/USDT", "ETH/USDT")
    with pytest.raises(ConfigError, match="is not in CRYPTOBOT_SYMBOLS"):
        dataclasses.replace(m, symbol="SOL/USDT")


# ---------------------------------------------------------------------------------------------------- plain numerals
_NUMERALS = [  # (key, value, accepted): only plain decimal numerals are numbers (issue 18 case 10)
    ("CRYPTOBOT_RISK_PCT", "1", True), ("CRYPTOBOT_RISK_PCT", "0.5", True), ("CRYPTOBOT_RISK_PCT", "1.50", True),
    ("CRYPTOBOT_MAX_DATA_AGE_S", "120", True), ("CRYPTOBOT_MIN_BALANCE_USD", "100", True),
    ("CRYPTOBOT_RISK_PCT", "1e0", False), ("CRYPTOBOT_RISK_PCT", "+1", False), ("CRYPTOBOT_RISK_PCT", " 1", False),
    ("CRYPTOBOT_RISK_PCT", "1 ", False), ("CRYPTOBOT_RISK_PCT", "1_000", False), ("CRYPTOBOT_RISK_PCT", "0x1", False),
    ("CRYPTOBOT_RISK_PCT", ".5", False), ("CRYPTOBOT_RISK_PCT", "1.", False), ("CRYPTOBOT_RISK_PCT", "01", False),
    ("CRYPTOBOT_RISK_PCT", "1E0", False), ("CRYPTOBOT_RISK_PCT", "１", False), ("CRYPTOBOT_LEVERAGE", "+1.0", False),
    ("CRYPTOBOT_MAX_DATA_AGE_S", "3e2", False), ("CRYPTOBOT_MAX_DATA_AGE_S", "+300", False),
    ("CRYPTOBOT_MAX_DATA_AGE_S", " 300", False), ("CRYPTOBOT_MAX_DATA_AGE_S", "0300", False),
    ("CRYPTOBOT_KILL_SWITCH_LOSSES", "0x3", False), ("CRYPTOBOT_MAX_OPEN_POSITIONS", "3.0", False),
]


@pytest.mark.parametrize("key,value,accepted", _NUMERALS)
def test_only_plain_decimal_numerals_pass_cryptobot_config(tmp_path, key, value, accepted):
    cb = str(Path(sys.executable).parent / "cryptobot")
    r = subprocess.run([cb, "config"], cwd=tmp_path, env=_clean_env(**{key: value}), capture_output=True, text=True,
                       timeout=60)
    if accepted:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 78 and r.stdout == "" and r.stderr.count("\n") == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"cryptobot config: {key}=") and ("is not a plain decimal number" in r.stderr or
                                                                 "is not a whole number" in r.stderr), r.stderr
    (tmp_path / ".env").write_text(f'{key}="{value}"\n')               # the same text quoted in .env: refused alike
    os.chmod(tmp_path / ".env", 0o600)
    r = subprocess.run([cb, "config"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and r.stderr.startswith(f"cryptobot config: {key}="), r.stderr
