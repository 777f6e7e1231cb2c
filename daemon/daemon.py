"""``certwarden run``: the long-running process, its threads, signals and systemd protocol.

Threads: the main thread waits for signals and pings systemd's watchdog; apscheduler runs all
PKI work (reconciles, renewals, CRL refreshes) on one worker thread, so PKI work never overlaps;
watchdog's observer thread only asks for a debounced reconcile; each enabled plugin has its own
delivery worker (see :mod:`certwarden.dispatch`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from certwarden.config import Config, read_secret
from certwarden.dispatch import Dispatcher, RetryPolicy
from certwarden.engine import Engine, Outlook
from certwarden.errors import CertwardenError, ConfigError
from certwarden.hookspecs import PluginContext
from certwarden.instance import InstanceLock
from certwarden.metrics import MetricsEndpoint
from certwarden.pki.store import PKIStore
from certwarden.plugin_manager import PluginSet, load_config_and_plugins
from certwarden.redact import redact
from certwarden.sdnotify import Notifier
from certwarden.state import StateStore
from certwarden.watcher import PKIWatcher

log = logging.getLogger("certwarden.daemon")
IDLE_WAKEUP_SECONDS = 30.0
_SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class RedactKeys(logging.Filter):
    """A last line of defence: no PEM private key ever reaches the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "PRIVATE KEY-----" in message:
            record.msg = redact(message)
            record.args = None
        if record.exc_info and not record.exc_text:
            # The formatter would append the traceback unfiltered: an exception's message can
            # hold the key too. Formatted here once; the formatter reuses exc_text.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and "PRIVATE KEY-----" in record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # journald reads a leading <N> as the syslog priority of the line.
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>"
        return prefix + super().format(record)


def _stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd gave us, not merely when JOURNAL_STREAM
    is set: a terminal opened from a desktop session inherits that variable (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{info.st_dev}:{info.st_ino}" == f"{device}:{inode}"


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    handler.addFilter(RedactKeys())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # apscheduler reports every job run at INFO; that is noise in the journal.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.INFO)  # one line per inotify event at DEBUG


def plugin_contexts(config: Config, plugins: PluginSet) -> dict[str, PluginContext]:
    contexts = {}
    for loaded in plugins:
        settings = config.plugins.get(loaded.name) or loaded.settings_class()
        contexts[loaded.name] = PluginContext(
            name=loaded.name,
            settings=settings,
            config=config,
            state_dir=config.state.dir / "plugins" / loaded.name,
            log=logging.getLogger(f"certwarden.plugins.{loaded.name}"),
        )
    return contexts


def open_store(config: Config) -> PKIStore:
    passphrase = None
    if config.pki.ca_passphrase_file is not None:
        passphrase = read_secret(config.pki.ca_passphrase_file, "CA passphrase")
    store = PKIStore(
        config.pki.dir,
        ca_passphrase=passphrase,
        lock_timeout=config.pki.lock_timeout.total_seconds(),
    )
    store.require()
    return store


class Daemon:
    def __init__(self, config_path: Path, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self._wake_fd = -1
        self._stop = False
        self._reload = False
        self._retry_now = False
        self._status = ""
        # Guards _stopping: see _add_job.
        self._jobs_lock = threading.Lock()
        self._stopping = False
        # The debounce of PKI changes: see _on_pki_change.
        self._watch_lock = threading.Lock()
        self._watch_pending = False
        self._last_change = 0.0

    # ---- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread; the wake-up pipe (see _install_signals) got it out of select.
        if signum == signal.SIGHUP:
            self._reload = True
        elif signum == signal.SIGUSR1:  # `certwarden deliveries retry` asks for it
            self._retry_now = True
        else:
            self._stop = True

    def _install_signals(self) -> None:
        # The kernel may deliver a signal to any thread; the Python handler then waits for the
        # main thread's next bytecode, which could be the end of a 30 s wait. The wake-up fd is
        # written by the C-level handler at once, whichever thread took the signal, and the
        # main loop selects on it. (Blocking the signals in other threads instead would leak
        # the blocked mask into every command plugins run.)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_fd = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)

    def _sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``, or until a signal arrives."""
        ready, _, _ = select.select([self._wake_fd], [], [], seconds)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_fd, 512):
                    pass

    # ---- life cycle --------------------------------------------------------------------------

    def run(self) -> int:
        config, plugins = load_config_and_plugins(self.config_path)
        configure_logging(config.daemon.log_level)
        self._install_signals()
        self._start(config, plugins)
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def _start(self, config: Config, plugins: PluginSet) -> None:
        self.config = config
        self.plugins = plugins
        store = open_store(config)
        self.instance = InstanceLock(config.state.dir)
        self.instance.acquire()
        with store.writing():
            pass  # completes a PKI write a crash interrupted, before anything reads it
        self.state = StateStore(config.state.dir / "state.sqlite3")
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        )
        self.dispatcher = Dispatcher(
            plugins,
            self.state,
            hook_timeout=config.daemon.hook_timeout.total_seconds(),
            retry=RetryPolicy(config.daemon.retry_initial, config.daemon.retry_max),
            on_retry_scheduled=self._schedule_retry,
        )
        self.dispatcher.configure(plugin_contexts(config, plugins))
        self.engine = Engine(config, store, self.state, self.dispatcher)
        outlook = self.engine.reconcile()
        # Deliveries left open by the last run (failed, or cut short by a crash) go first.
        self.dispatcher.enqueue_open(due_only=False)
        self._sync_plugins()
        certificates, crl = self.engine.current_infos()
        self._log_failures(
            "daemon_started",
            self.dispatcher.call_lifecycle(
                "certwarden_daemon_started", certificates=certificates, crl=crl
            ),
        )
        self.scheduler.start()
        self._schedule_periodic()
        self._plan(outlook)
        self.metrics = MetricsEndpoint(
            lambda: self.config, self.dispatcher, lambda: self.engine.last_reconcile
        )
        self.metrics.apply(config.metrics)
        self.watcher = PKIWatcher(store.root, self._on_pki_change)
        self.watcher.start()
        self.notifier.ready(outlook.status_line())
        log.info("certwarden started: %s", outlook.status_line())

    def _main_loop(self) -> None:
        interval = IDLE_WAKEUP_SECONDS
        if self.notifier.watchdog_interval:
            interval = min(interval, self.notifier.watchdog_interval / 2)
        self.notifier.watchdog()
        while not self._stop:
            self._sleep(interval)
            self.notifier.watchdog()
            if self._reload and not self._stop:
                self._reload = False
                self._reload_config()
            if self._retry_now and not self._stop:
                self._retry_now = False
                log.info("SIGUSR1: retrying the deliveries that are due now")
                self.dispatcher.enqueue_open(due_only=True)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping")
        self.watcher.stop()
        with self._jobs_lock:
            self._stopping = True
        self.scheduler.shutdown(wait=True)  # lets a running renewal or reconcile finish
        timeout = self.config.daemon.shutdown_timeout.total_seconds()
        if not self.dispatcher.stop(timeout):
            log.warning("deliveries still running after %g s; they will be retried", timeout)
        self._log_failures(
            "daemon_stopping", self.dispatcher.call_lifecycle("certwarden_daemon_stopping")
        )
        self.metrics.stop()
        self.state.close()
        self.instance.release()
        log.info("stopped")

    def _reload_config(self) -> None:
        from certwarden.config import format_duration

        self.notifier.reloading()
        log.info("reloading %s", self.config_path)
        try:
            config, _ = load_config_and_plugins(self.config_path)
            restart_needed = [
                what
                for what, old, new in (
                    ("[pki] dir", self.config.pki.dir, config.pki.dir),
                    ("[state] dir", self.config.state.dir, config.state.dir),
                    (
                        "[daemon] plugin_files",
                        self.config.daemon.plugin_files,
                        config.daemon.plugin_files,
                    ),
                )
                if old != new
            ]
            if restart_needed:
                raise ConfigError(
                    [f"{what} changed: restart the service to apply it" for what in restart_needed],
                    str(self.config_path),
                )
            # Read again even when the path is the same: the passphrase may have been changed
            # with the CA key. A file that cannot be used refuses the reload, as at start-up.
            passphrase = None
            passphrase_file = config.pki.ca_passphrase_file
            if passphrase_file is not None:
                try:
                    passphrase = read_secret(passphrase_file, "CA passphrase")
                except ConfigError as exc:
                    raise ConfigError(
                        [f"pki.ca_passphrase_file: {exc.source}: {p}" for p in exc.problems],
                        str(self.config_path),
                    ) from None
        except CertwardenError as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log.error("reload refused, keeping the running configuration: %s", problem)
            self.notifier.ready(self._status)
            return
        # The PKI store lives as long as the daemon: [pki] is applied to it here. Work already
        # running may still use the old values (each is read once, when needed).
        store = self.engine.store
        old_file, old_timeout = self.config.pki.ca_passphrase_file, store.lock.timeout
        if passphrase_file != old_file:
            log.info(
                "[pki] ca_passphrase_file changed from %s to %s: applied",
                old_file or "not set",
                passphrase_file or "not set",
            )
        elif passphrase != store.ca_passphrase:
            log.info("[pki] ca_passphrase_file %s holds a new passphrase: applied", passphrase_file)
        store.ca_passphrase = passphrase
        new_timeout = config.pki.lock_timeout.total_seconds()
        if new_timeout != old_timeout:
            log.info(
                "[pki] lock_timeout changed from %s to %s: applied",
                format_duration(timedelta(seconds=old_timeout)),
                format_duration(config.pki.lock_timeout),
            )
        store.lock.timeout = new_timeout
        self.config = config
        configure_logging(config.daemon.log_level)
        self.dispatcher.hook_timeout = config.daemon.hook_timeout.total_seconds()
        self.dispatcher.retry = RetryPolicy(config.daemon.retry_initial, config.daemon.retry_max)
        self.dispatcher.configure(plugin_contexts(config, self.plugins))
        self.engine.config = config
        self.metrics.apply(config.metrics)
        self._schedule_periodic()
        self._submit("reconcile", self.engine.reconcile)
        self._submit("sync", self._sync_plugins)  # the plugins' new settings take effect
        self.notifier.ready(self._status)
        log.info("configuration reloaded")

    # ---- scheduling --------------------------------------------------------------------------

    def _run_job(self, name: str, work: object) -> None:
        assert callable(work)
        try:
            outlook = work()
        except CertwardenError as exc:
            log.error("%s failed: %s", name, exc)
            return
        except Exception:
            log.exception("%s failed unexpectedly (this is a bug)", name)
            return
        if isinstance(outlook, Outlook):
            self._plan(outlook)

    def _add_job(self, *args: Any, **kwargs: Any) -> None:
        # apscheduler's shutdown(wait=True) holds its job store lock while it waits for the
        # running job; if that job (or a delivery worker) then added a job, it would wait for
        # that lock forever and the daemon would never exit. Once stopping, add nothing.
        with self._jobs_lock:
            if not self._stopping:
                self.scheduler.add_job(*args, **kwargs)

    def _submit(self, job_id: str, work: object, at: datetime | None = None) -> None:
        self._add_job(
            self._run_job,
            "date",
            run_date=at or datetime.now(UTC),
            args=(job_id, work),
            id=job_id,
            replace_existing=True,
            # A job submitted while the last run of the same id still runs (a renewal job
            # planning the next one, a change seen during a reconcile) must not be skipped as
            # "maximum number of running instances reached": a date job that is skipped is
            # gone. The single worker thread still runs them one after the other.
            max_instances=2,
        )

    def _schedule_periodic(self) -> None:
        self._add_job(
            self._run_job,
            "interval",
            seconds=self.config.daemon.reconcile_interval.total_seconds(),
            args=("periodic reconcile", self._periodic),
            id="reconcile-periodic",
            replace_existing=True,
        )

    def _periodic(self) -> Outlook:
        self.dispatcher.enqueue_open(due_only=True)
        return self.engine.renew_due()

    def _plan(self, outlook: Outlook) -> None:
        """Point the renewal and CRL jobs at their next due times."""
        if outlook.next_renewal is not None:
            self._submit("renewals", self.engine.renew_due, outlook.next_renewal.due_at)
        if outlook.crl_refresh_at is not None:
            self._submit("crl-refresh", self.engine.refresh_crl, outlook.crl_refresh_at)
        status = outlook.status_line()
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    def _schedule_retry(self, at: float) -> None:
        when = datetime.fromtimestamp(at, UTC)
        job = self.scheduler.get_job("retry") if self.scheduler.running else None
        if job is not None and job.next_run_time is not None and job.next_run_time <= when:
            return
        self._add_job(
            self.dispatcher.enqueue_open,
            "date",
            run_date=when,
            kwargs={"due_only": True},
            id="retry",
            replace_existing=True,
        )

    # ---- plugins' sync -------------------------------------------------------------------------

    def _sync_plugins(self, only: tuple[str, ...] | None = None, attempt: int = 1) -> None:
        """Call certwarden_sync (on the plugins ``only``); retry each failure with backoff.

        A failed sync is not a delivery (there is no event to record): it is retried in
        memory, and a restart or a reload syncs every plugin anyway.
        """
        if only is None:  # a full sync replaces the retries still planned
            for job in self.scheduler.get_jobs():
                if job.id.startswith("sync-"):
                    job.remove()
        certificates, crl = self.engine.current_infos()
        failed = self.dispatcher.call_lifecycle(
            "certwarden_sync", only=only, certificates=certificates, crl=crl
        )
        for plugin in only or ():
            if plugin not in failed:
                log.info("plugin %s: sync succeeded (attempt %d)", plugin, attempt)
        for plugin, error in failed.items():
            delay = self.dispatcher.retry.delay(attempt)
            log.error(
                "plugin %s: sync failed (attempt %d, retry in %s): %s",
                plugin,
                attempt,
                timedelta(seconds=round(delay)),
                error,
            )
            self._submit(
                f"sync-{plugin}",
                functools.partial(self._sync_plugins, (plugin,), attempt + 1),
                datetime.now(UTC) + timedelta(seconds=delay),
            )

    @staticmethod
    def _log_failures(hook: str, failed: dict[str, str]) -> None:
        for plugin, error in failed.items():
            log.error("plugin %s: %s failed: %s", plugin, hook, error)

    def _on_pki_change(self, path: str) -> None:
        # Called for every inotify event: a dozen per easy-rsa command, 15 per certificate in
        # a renewal burst. Rescheduling an apscheduler job each time took a third of the
        # daemon's CPU in a burst of 10,000; only the first change after a reconcile schedules
        # one, and that job waits until the folder has been quiet for the debounce period.
        log.debug("PKI changed: %s", path)
        with self._watch_lock:
            self._last_change = time.monotonic()
            if self._watch_pending:
                return
            self._watch_pending = True
        self._submit("reconcile-watch", self._reconcile_when_quiet, self._quiet_at())

    def _quiet_at(self) -> datetime:
        """When the PKI will have been quiet for the debounce period, if nothing else changes."""
        debounce = self.config.daemon.debounce.total_seconds()
        remaining = self._last_change + debounce - time.monotonic()
        return datetime.now(UTC) + timedelta(seconds=max(remaining, 0.0))

    def _reconcile_when_quiet(self) -> Outlook | None:
        with self._watch_lock:
            at = self._quiet_at()
            if at > datetime.now(UTC):  # changed again since: wait for the rest of the quiet
                self._submit("reconcile-watch", self._reconcile_when_quiet, at)
                return None
            self._watch_pending = False  # a change from now on schedules the next reconcile
        return self.engine.reconcile()


def run(config_path: Path) -> int:
    return Daemon(config_path).run()
