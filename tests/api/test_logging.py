"""Logging like a library: one ``llm_datadist.*`` hierarchy with the official ``LLM_DATADIST`` alias, stderr only,
WARNING unless the environment says otherwise, one warning per misconfiguration, errors logged or raised, not both."""
from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
import uuid
from typing import Dict, List

import pki
import pytest

import llm_datadist
from llm_datadist import LLMClusterInfo, LLMConfig, LLMException, LLMRole, LLMStatusCode
from llm_datadist.utils import log
from llm_datadist.utils.utils import raise_if_false
from llm_datadist.v1 import LlmDataDist, LlmRole


_CLEAN_ENV = ("ASCEND_GLOBAL_LOG_LEVEL", "LLM_DATADIST_LOG_LEVEL", "LLM_DATADIST_LINK_SECRET")
_TIMEOUT_S = 120  # a child process that imports the package and links two instances; it needs a few seconds
_NO_SECRET = "without a link secret"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (environment without the log and secret variables, plus ``env``)."""
    child_env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
    child_env.update(env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env, capture_output=True,
                            text=True, timeout=_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result


class _Records(logging.Handler):
    """Collects the records that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> List[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def package_records():
    """A handler on ``llm_datadist``; the levels of both loggers are restored afterwards."""
    package, alias = logging.getLogger(log.PACKAGE_LOGGER_NAME), logging.getLogger(log.LOGGER_NAME)
    levels = package.level, alias.level
    handler = _Records()
    package.addHandler(handler)
    try:
        yield handler
    finally:
        package.removeHandler(handler)
        package.setLevel(levels[0])
        alias.setLevel(levels[1])


# ---- defaults ------------------------------------------------------------------------------------
def test_default_keeps_stdout_clean_and_shows_warnings_on_stderr():
    result = _run("""
        import logging
        from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole
        from llm_datadist.utils.log import logger
        config = LLMConfig()
        config.enable_cache_manager = True
        config.listen_ip_info = "127.0.0.1:0"
        dd = LLMDataDist(LLMRole.PROMPT, 1)
        dd.init(config.generate_options())
        try:
            config.listen_ip_info = "not an address"
        except LLMException:
            pass
        dd.finalize()
        logger.info("info-through-the-alias")
        logging.getLogger("llm_datadist._engine.x").info("info-inside")
        logging.getLogger("llm_datadist._engine.x").warning("warning-inside")
        logger.warning("warning-through-the-alias")
        print("app-output")
    """)
    assert result.stdout == "app-output\n"
    assert result.stderr.count("warning-inside") == 1 and result.stderr.count("warning-through-the-alias") == 1
    assert "info-" not in result.stderr and "not an address" not in result.stderr, result.stderr
    assert "[WARNING] llm_datadist._engine.x(" in result.stderr


def test_levels_default_to_warning():
    result = _run("""
        import logging
        import llm_datadist
        print(logging.getLogger("llm_datadist").level, logging.getLogger("LLM_DATADIST").getEffectiveLevel())
    """)
    assert result.stdout.split() == [str(logging.WARNING)] * 2


def test_the_application_logging_set_up_takes_over():
    result = _run("""
        import logging, sys
        logging.basicConfig(stream=sys.stderr, format="APP %(name)s %(message)s")
        import llm_datadist
        from llm_datadist.utils.log import logger
        logging.getLogger("llm_datadist.v2").warning("one")
        logger.warning("two")
    """)
    assert result.stderr.splitlines() == ["APP llm_datadist.v2 one", "APP LLM_DATADIST two"]


def test_handlers_are_configured_once():
    package, alias = logging.getLogger(log.PACKAGE_LOGGER_NAME), logging.getLogger(log.LOGGER_NAME)
    assert log.logger is alias and alias.parent is package and alias.handlers == []
    assert log._configure() is alias
    assert len([h for h in package.handlers if isinstance(h, log._StderrHandler)]) == 1


def test_every_module_logs_under_its_own_name():
    # the vLLM connector logs under vllm's hierarchy (vllm's handlers show it) and imports vllm: not here
    names = [m.name for m in pkgutil.walk_packages(llm_datadist.__path__, "llm_datadist.")
             if not m.name.startswith("llm_datadist.integrations.vllm.")]
    assert "llm_datadist._engine.link_manager" in names and "llm_datadist.v2.tensors" in names
    configured_here = {("llm_datadist.utils.log", "logger"): log.LOGGER_NAME,
                       ("llm_datadist.utils.log", "_package"): log.PACKAGE_LOGGER_NAME}
    found = 0
    for name in names:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, logging.Logger) and not attr.startswith("__"):
                expected = configured_here.get((name, attr), name)
                assert value.name == expected, (name, attr, value.name)
                found += 1
    assert found >= 20


# ---- the alias -----------------------------------------------------------------------------------
def test_alias_records_reach_the_package_handlers_at_the_package_level(package_records, caplog):
    alias, package = logging.getLogger(log.LOGGER_NAME), logging.getLogger(log.PACKAGE_LOGGER_NAME)
    log.set_log_level(logging.WARNING)
    alias.info("hidden")
    alias.warning("shown %d", 1)
    assert package_records.messages() == ["shown 1"]
    assert package_records.records[0].name == log.LOGGER_NAME
    assert [r.getMessage() for r in caplog.records if r.name == log.LOGGER_NAME] == ["shown 1"]  # root: once
    log.set_log_level(logging.INFO)
    assert package.level == logging.INFO and alias.getEffectiveLevel() == logging.INFO
    alias.info("now shown")
    logging.getLogger("llm_datadist._engine.engine").info("inside shown")
    assert package_records.messages() == ["shown 1", "now shown", "inside shown"]
    package.setLevel(logging.ERROR)  # set directly on the package logger: the alias follows too
    alias.warning("dropped")
    assert package_records.messages()[-1] == "inside shown"


# ---- levels from the environment ------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, logging.WARNING),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "0"}, logging.DEBUG),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "1"}, logging.INFO),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "2"}, logging.WARNING),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "3"}, logging.ERROR),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "4"}, logging.CRITICAL + 10),
        ({"ASCEND_GLOBAL_LOG_LEVEL": " "}, logging.WARNING),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "3", "LLM_DATADIST_LOG_LEVEL": "info"}, logging.INFO),
        ({"ASCEND_GLOBAL_LOG_LEVEL": "0", "LLM_DATADIST_LOG_LEVEL": "WARNING"}, logging.WARNING),
        ({"LLM_DATADIST_LOG_LEVEL": "0"}, logging.DEBUG),
        ({"LLM_DATADIST_LOG_LEVEL": "10"}, logging.DEBUG),
        ({"LLM_DATADIST_LOG_LEVEL": "Debug"}, logging.DEBUG),
    ],
)
def test_level_from_env(monkeypatch, env: Dict[str, str], expected: int):
    for key in _CLEAN_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert log.level_from_env() == expected


@pytest.mark.parametrize("env, shown, hidden", [
    ({"LLM_DATADIST_LOG_LEVEL": "INFO"}, "info-line", "debug-line"),
    ({"ASCEND_GLOBAL_LOG_LEVEL": "0"}, "debug-line", "no such line"),
    ({"ASCEND_GLOBAL_LOG_LEVEL": "3"}, "error-line", "warning-line"),
])
def test_the_environment_level_applies_from_import(env, shown, hidden):
    result = _run("""
        import logging
        import llm_datadist
        inside = logging.getLogger("llm_datadist.v2.llm_datadist")
        inside.debug("debug-line"); inside.info("info-line"); inside.warning("warning-line"); inside.error("error-line")
    """, **env)
    assert shown in result.stderr and hidden not in result.stderr, result.stderr
    assert result.stdout == ""


def test_an_unknown_level_in_the_environment_warns_once():
    result = _run("""
        import logging
        from llm_datadist.utils import log
        assert log.level_from_env() == logging.INFO
        assert log.level_from_env() == logging.INFO
        print(logging.getLogger("llm_datadist").level)
    """, LLM_DATADIST_LOG_LEVEL="LOUD", ASCEND_GLOBAL_LOG_LEVEL="1")
    assert result.stdout.split() == [str(logging.INFO)]
    lines = [line for line in result.stderr.splitlines() if "is not a log level" in line]
    assert len(lines) == 1 and "[WARNING]" in lines[0] and "LLM_DATADIST_LOG_LEVEL='LOUD'" in lines[0], result.stderr


def test_an_unknown_level_warns_on_the_logger_not_by_raising(monkeypatch, caplog):
    bogus = "bogus-" + uuid.uuid4().hex[:8]  # a value no other test has complained about in this process
    monkeypatch.setenv("LLM_DATADIST_LOG_LEVEL", bogus)
    monkeypatch.setenv("ASCEND_GLOBAL_LOG_LEVEL", "junk")
    with caplog.at_level(logging.DEBUG, logger=log.PACKAGE_LOGGER_NAME):
        assert log.level_from_env() == logging.WARNING
        assert log.level_from_env() == logging.WARNING
    complaints = [r for r in caplog.records if "is not a log level" in r.getMessage()]
    assert sorted(r.getMessage().split("=")[0] for r in complaints) == ["ASCEND_GLOBAL_LOG_LEVEL",
                                                                       "LLM_DATADIST_LOG_LEVEL"]
    assert all(r.levelno == logging.WARNING and r.name.startswith("llm_datadist.") for r in complaints)


# ---- listeners without a link secret ---------------------------------------------------------------
_LISTEN_TWICE = """
    from llm_datadist import LLMConfig, LLMDataDist, LLMRole
    made = []
    for cluster_id in (1, 2):
        config = LLMConfig()
        config.enable_cache_manager = True
        config.listen_ip_info = "{ip}:0"
        {secret}
        dd = LLMDataDist(LLMRole.PROMPT, cluster_id)
        dd.init(config.generate_options())
        made.append(dd)
    for dd in made:
        dd.finalize()
"""


def test_listening_on_all_interfaces_without_a_secret_warns_once_per_process():
    result = _run(_LISTEN_TWICE.format(ip="0.0.0.0", secret=""))
    lines = [line for line in result.stderr.splitlines() if _NO_SECRET in line]
    assert len(lines) == 1 and lines[0].startswith("[WARNING]") and "0.0.0.0" in lines[0], result.stderr
    assert "link_secret" in lines[0] and "LLM_DATADIST_LINK_SECRET" in lines[0]


@pytest.mark.parametrize("ip, secret, env", [
    ("0.0.0.0", "config.link_secret = 'shared words, long enough'", {}),
    ("0.0.0.0", "", {"LLM_DATADIST_LINK_SECRET": "shared words, long enough"}),
    ("127.0.0.1", "", {}),
])
def test_no_warning_with_a_secret_or_on_loopback(ip, secret, env):
    result = _run(_LISTEN_TWICE.format(ip=ip, secret=secret), **env)
    assert _NO_SECRET not in result.stderr and result.stderr == "", result.stderr


def test_the_listener_warning_says_what_strangers_can_do_and_how_to_stop_them():
    result = _run(_LISTEN_TWICE.format(ip="0.0.0.0", secret=""))
    line = next(line for line in result.stderr.splitlines() if _NO_SECRET in line)
    for words in ("or TLS", "any cluster id", "read every cache", "write every cache", "tls_cert_file"):
        assert words in line, (words, line)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_no_listener_warning_with_mutual_tls(tmp_path):
    pki.make_ca(str(tmp_path), "ca")
    pki.make_cert(str(tmp_path), "me", "ca")
    files = "; ".join(f"config.{key} = {value!r}" for key, value in pki.files(str(tmp_path), "me").items())
    result = _run(_LISTEN_TWICE.format(ip="0.0.0.0", secret=files))
    assert result.stderr == "", result.stderr
    control = _run(_LISTEN_TWICE.format(ip="0.0.0.0", secret=""))  # the same listeners without TLS do warn
    assert _NO_SECRET in control.stderr


@pytest.mark.parametrize("secret, warns", [("s3cr", True), ("fifteen chars!!", True),
                                           ("sixteen chars!!!", False)])
def test_a_short_link_secret_warns_once(secret, warns):
    result = _run(_LISTEN_TWICE.format(ip="127.0.0.1", secret=f"config.link_secret = {secret!r}"))
    lines = [line for line in result.stderr.splitlines() if "the link secret has only" in line]
    if warns:
        assert len(lines) == 1 and lines[0].startswith("[WARNING]"), result.stderr
        assert f"only {len(secret)} bytes" in lines[0] and secret not in lines[0]
    else:
        assert result.stderr == "", result.stderr


def test_rank_table_listener_on_all_interfaces_without_a_secret_warns_once():
    devices = [{"device_id": str(i), "device_ip": "0.0.0.0", "rank_id": str(i)} for i in range(2)]
    rank_table = json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                             "server_list": [{"server_id": "127.0.0.1", "device": devices}]})
    result = _run(f"""
        import time
        from llm_datadist import LLMConfig, LLMDataDist, LLMRole, RegisterMemStatus
        config = LLMConfig()
        config.enable_cache_manager = True
        made = [LLMDataDist(LLMRole.PROMPT, 1), LLMDataDist(LLMRole.DECODER, 2)]
        for dd in made:
            dd.init(config.generate_options())
        comm_ids = [dd.link("logging-test", {{1: 0, 2: 1}}, {rank_table!r}) for dd in made]
        deadline = time.monotonic() + 30
        while not all(dd.query_register_mem_status(c) is RegisterMemStatus.OK for dd, c in zip(made, comm_ids)):
            assert time.monotonic() < deadline, "the rank-table link never became OK"
            time.sleep(0.01)
        for dd, comm_id in zip(made, comm_ids):
            dd.unlink(comm_id)
            dd.finalize()
    """)
    lines = [line for line in result.stderr.splitlines() if _NO_SECRET in line]
    assert len(lines) == 1 and "0.0.0.0" in lines[0], result.stderr


# ---- errors: logged or raised, not both -------------------------------------------------------------
def test_raised_and_returned_errors_are_not_logged_at_error(make_dd, free_port, tools, caplog):
    with caplog.at_level(logging.DEBUG, logger=log.PACKAGE_LOGGER_NAME):
        with pytest.raises(LLMException, match="bad value 3"):
            raise_if_false(False, "bad value {}", 3)
        with pytest.raises(LLMException, match="listen_ip_info"):
            LLMConfig().listen_ip_info = "300.1.1.1:5"
        with pytest.raises(LLMException, match="ge.flowGraphMemMaxSize"):
            make_dd(LLMRole.PROMPT, 1, init=False).init(dict(tools.make_options(), **{"ge.flowGraphMemMaxSize": "x"}))
        with pytest.raises(LLMException, match="memory pool config"):
            make_dd(LLMRole.PROMPT, 3, init=False).init(tools.make_options(mem_pool_cfg="not json"))
        info = LLMClusterInfo()
        info.remote_cluster_id = 77
        info.append_remote_ip_info("127.0.0.1", free_port())  # nobody listens there
        ret, rets = make_dd(LLMRole.DECODER, 2).link_clusters([info], 200)
        assert ret != LLMStatusCode.LLM_SUCCESS and rets[0] != LLMStatusCode.LLM_SUCCESS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    for text in ("bad value 3", "300.1.1.1", "ge.flowGraphMemMaxSize", "memory pool config"):
        assert text in debug, text
    assert any(r.levelno == logging.INFO and "link to 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_v1_status_codes_are_not_logged_at_error(caplog):
    dd = LlmDataDist(5, LlmRole.kPrompt)  # not initialized: every call returns a failure code
    with caplog.at_level(logging.DEBUG, logger=log.PACKAGE_LOGGER_NAME):
        code, rets = dd.UnlinkLlmClusters([], 1000)
    assert (code, rets) == (LLMStatusCode.LLM_FAILED, [])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any(r.levelno == logging.DEBUG and "UnlinkLlmClusters" in r.getMessage() for r in caplog.records)
