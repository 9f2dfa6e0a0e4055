"""Settings: declared once, read from INI and environment, with located errors."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from greentask.config import SETTINGS, load, render_markdown, to_address, to_size
from greentask.errors import ConfigError

from .conftest import PYTHON, ROOT, wait_until


def test_defaults_need_no_file():
    config = load(environ={})
    assert config.worker.bind == ("127.0.0.1", 12345)
    assert config.worker.processes == (os.cpu_count() or 1)
    assert config.worker.max_line == 1024 * 1024
    assert config.worker.tasks == ["greentask.examples.basic", "greentask.examples.mail"]
    import greentask.examples.mail  # noqa: F401 (declares [smtp])
    assert config.smtp.port == 2525  # the development mail catcher
    assert config.gateway.mail_catcher == ("127.0.0.1", 8025)


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "w.ini"
    path.write_text("[worker]\nprocesses = 3\nconcurrency = 5\nmax_line = 64KiB\n")
    config = load(str(path), environ={"GREENTASK_WORKER_CONCURRENCY": "7"},
                  overrides={("worker", "processes"): "4"})
    assert (config.worker.processes, config.worker.concurrency) == (4, 7)
    assert config.worker.max_line == 65536


@pytest.mark.parametrize("text, expected", [
    ("[worker]\nprocesses = many\n",
     "w.ini: [worker] processes = 'many': expected 'auto' or a whole number of at least 1"),
    ("[worker]\nbind = localhost\n",
     "w.ini: [worker] bind = 'localhost': expected HOST:PORT"),
    ("[worker]\ntask_timeout = 0\n", "[worker] task_timeout = '0': expected a positive number"),
    ("[worker]\nloglevel = loud\n", "expected one of debug, info, warning, error, critical"),
    ("[worker]\ndebug = maybe\n", "[worker] debug = 'maybe': expected true or false"),
    ("[worker]\ntasks = my-tasks\n", "'my-tasks' is not a module name"),
    ("[worker]\nmax_line = 1TB\n", "expected a positive size in bytes"),
    ("[gateway]\nallowed_origins = example.org\n", "'example.org' is not an origin"),
    ("[gateway]\ntask_servers = \n", "expected one or more HOST:PORT"),
    ("[worker]\nproceses = 2\n", "[worker] proceses: unknown key; the keys of [worker] are"),
    ("processes = 2\n", "not a valid INI file"),
])
def test_bad_file_names_file_section_key_and_accepted_values(tmp_path, text, expected):
    path = tmp_path / "w.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path), environ={})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("[smtp]\nport = 0\n", "w.ini: [smtp] port = '0': expected a TCP port from 1 to 65535"),
    ("[smtp]\nprot = 25\n", "w.ini: [smtp] prot: unknown key; the keys of [smtp] are host, "
                           "port, sender, max_parallel"),
    ("[workers]\nprocesses = 2\n", "w.ini: unknown section [workers]; the sections are "
     "[worker], [gateway], [smtp] (declared by greentask.examples.mail_settings) (a task "
     "module declares its own, once it is in [worker] tasks)"),
])
def test_a_task_modules_section_is_checked_once_the_module_is_imported(tmp_path, text,
                                                                         expected):
    import greentask.examples.mail  # noqa: F401 (declares [smtp])
    path = tmp_path / "w.ini"
    path.write_text(text)
    config = load(str(path), environ={})  # not yet: the section may be a task module's
    with pytest.raises(ConfigError) as info:
        config.check_sections()
    assert str(info.value) == f"{tmp_path}/{expected}"


def test_a_task_module_declares_its_own_section_read_from_file_and_environment(tmp_path):
    from greentask.config import Setting, declare_section
    from greentask.config.converters import to_positive_int, to_text
    from greentask.config.settings import DECLARED

    path = tmp_path / "w.ini"
    path.write_text("[billing]\ncurrency = EUR\n")
    config = load(str(path), environ={"GREENTASK_BILLING_BATCH": "20"})
    try:
        assert declare_section("tests.billing", Setting(
            "billing", "currency", "USD", to_text, "Currency of invoices."), Setting(
            "billing", "batch", "100", to_positive_int, "Invoices per task.")) == "billing"
        assert (config.billing.currency, config.billing.batch) == ("EUR", 20)
        config.check_sections()
        with pytest.raises(ValueError, match=r"\[worker\] is greentask's own section"):
            declare_section("tests.billing", Setting("worker", "x", "1", to_text, "."))
        with pytest.raises(ValueError, match=r"already declared by tests\.billing"):
            declare_section("tests.other", Setting("billing", "x", "1", to_text, "."))
        with pytest.raises(ConfigError, match="GREENTASK_BILLING_BACTH: no such setting"):
            load(str(path), environ={"GREENTASK_BILLING_BACTH": "2"}).check_sections()
        with pytest.raises(ConfigError, match=r"^environment variable "
                           r"GREENTASK_BILLING_BATCH='none' \(\[billing\] batch\): "):
            load(environ={"GREENTASK_BILLING_BATCH": "none"}).billing  # noqa: B018
    finally:
        DECLARED.pop("billing", None)
    assert "billing" not in render_markdown()  # docs/config.md has greentask's own only


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(str(tmp_path / "nope.ini"), environ={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^environment variable "
                       r"GREENTASK_WORKER_CONCURRENCY='-1' \(\[worker\] concurrency\): "):
        load(environ={"GREENTASK_WORKER_CONCURRENCY": "-1"})
    with pytest.raises(ConfigError, match="GREENTASK_WORKER_PROCESES: no such setting"):
        load(environ={"GREENTASK_WORKER_PROCESES": "2"})


def test_converters():
    assert to_address("[::1]:80") == ("::1", 80)
    assert to_size("2MiB") == 2 * 1024 * 1024 and to_size("100") == 100
    with pytest.raises(ValueError):
        to_address("127.0.0.1:70000")


def test_docs_config_md_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "config.md").read_text() == render_markdown(), \
        "regenerate it: greentask config-doc > docs/config.md"


def test_shipped_worker_ini_sets_every_key_to_its_default():
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "conf" / "worker.ini")
    from greentask.config.settings import DECLARED
    from greentask.examples.mail_settings import SECTION
    for setting in (*SETTINGS, *DECLARED[SECTION][1].values()):
        assert parser.get(setting.section, setting.key) == setting.default, setting.key
    load(str(ROOT / "conf" / "worker.ini"), environ={}).check_sections()


def run_worker_cli(*args, env=None):
    return subprocess.run([PYTHON, "-m", "greentask.worker", *args], cwd=ROOT, timeout=30,
                          capture_output=True, text=True, env=env)


def test_check_flag_validates_and_lists_tasks():
    result = run_worker_cli("-c", "conf/worker.ini", "--check")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "send_bulk" in result.stdout


def test_bad_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "w.ini"
    path.write_text("[worker]\nconcurrency = lots\n")
    result = run_worker_cli("-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "[worker] concurrency = 'lots'" in result.stderr
    result = run_worker_cli("-c", "conf/worker.ini", "--processes", "0", "--check")
    assert result.returncode == 2 and "command line: [worker] processes = '0'" in result.stderr


def test_a_misspelt_or_wrong_task_section_stops_the_daemon_and_a_reload(tmp_path, make_daemon):
    path = tmp_path / "w.ini"
    path.write_text("[worker]\nprocesses = 1\n[smpt]\nport = 2525\n")
    for flags in (["--check"], []):
        result = run_worker_cli("-c", str(path), *flags)
        assert result.returncode == 2, result.stderr
        assert "unknown section [smpt]; the sections are [worker], [gateway], [smtp]" \
            in result.stderr
    daemon = make_daemon(processes=1)
    children = daemon.children()
    daemon.config.write_text(daemon.config.read_text() + "[smtp]\nport = 0\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in daemon.log(), 15, "the refusal")
    assert "[smtp] port = '0': expected a TCP port" in daemon.log()
    assert daemon.children() == children  # the running generation keeps serving


def test_check_reports_a_task_module_that_does_not_import(tmp_path):
    result = run_worker_cli("-c", "conf/worker.ini", "--check",
                            env={**os.environ, "GREENTASK_WORKER_TASKS": "no_such_module"})
    assert result.returncode == 3
    assert "No module named 'no_such_module'" in result.stderr


def test_the_client_and_the_cli_import_no_gevent():
    """A program that only calls tasks, or runs ``greentask status``, is not patched
    and does not load gevent; only the daemon (which patches) and the gateway do."""
    code = ("import sys, greentask, greentask.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'greenlet')))")
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
