"""Calling plugins: each implementation on its own, recorded, retried.

Core code never calls ``pm.hook.x`` directly. Every enabled plugin has its own worker thread
and queue, so events reach one plugin in the order they happened, and a plugin that hangs or
fails holds up only itself. Each call runs in a throw-away thread joined with the configured
timeout: a hung call is abandoned (Python cannot kill a thread) and recorded as failed.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from certwarden.errors import CertwardenError
from certwarden.events import Event, EventKind
from certwarden.hookspecs import HealthProblem, PluginContext
from certwarden.plugin_manager import PluginSet
from certwarden.redact import redact
from certwarden.state import NewDelivery, StateStore

log = logging.getLogger("certwarden.dispatch")
_STOP = -1
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class RetryPolicy:
    initial: timedelta
    maximum: timedelta

    def delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling, capped, with 10% jitter."""
        base = self.initial.total_seconds() * 2.0 ** max(attempts - 1, 0)
        base = min(base, self.maximum.total_seconds())
        return base * random.uniform(0.9, 1.0)  # noqa: S311 - spreading, not secrecy


class CallTimeout(Exception):
    pass


def call_with_timeout(function: Callable[..., Any], kwargs: dict[str, Any], timeout: float) -> Any:
    """Run ``function(**kwargs)`` in its own thread; raise CallTimeout if it takes too long."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function(**kwargs))
        except BaseException as exc:  # handed back to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"hook-{function.__name__}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CallTimeout(f"did not return within {timeout:g} s")
    if error:
        raise error[0]
    return result[0] if result else None


def describe_error(exc: BaseException) -> str:
    """One line for the delivery record; plugins must not put secrets in exceptions."""
    text = (
        str(exc)
        if isinstance(exc, (CertwardenError, CallTimeout))
        else f"{type(exc).__name__}: {exc}"
    )
    # Redacted before the cut: a truncated key would no longer look like one.
    text = " ".join(redact(text).split())
    return text[:MAX_ERROR_LENGTH]


class PluginHost:
    """Configures the enabled plugins and calls their non-delivery hooks, each on its own."""

    def __init__(self, plugins: PluginSet, *, hook_timeout: float) -> None:
        self.plugins = plugins
        self.hook_timeout = hook_timeout
        self.enabled: set[str] = set()
        self.subscriptions: dict[str, frozenset[str]] = {}
        self.contexts: dict[str, PluginContext] = {}

    # ---- configuration and life cycle ------------------------------------------------------

    def configure(self, contexts: dict[str, PluginContext]) -> None:
        """Give each enabled plugin its context; a plugin whose configure fails is disabled."""
        enabled: set[str] = set()
        for name, context in contexts.items():
            if not context.settings.enabled:
                continue
            ok = True
            for plugin_name, function in self.plugins.implementations("certwarden_configure"):
                if plugin_name != name:
                    continue
                try:
                    call_with_timeout(function, {"context": context}, self.hook_timeout)
                except Exception as exc:
                    ok = False
                    log.error(
                        "plugin %s: configure failed, plugin disabled: %s",
                        name,
                        describe_error(exc),
                    )
            if ok:
                enabled.add(name)
        self.contexts = contexts
        self.enabled = enabled
        self.subscriptions = self._ask_subscriptions()
        log.info("plugins enabled: %s", ", ".join(sorted(enabled)) or "none")

    def _ask_subscriptions(self) -> dict[str, frozenset[str]]:
        answers: dict[str, frozenset[str]] = {}
        for name, function in self.plugins.implementations("certwarden_subscriptions"):
            if name not in self.enabled:
                continue
            try:
                kinds = call_with_timeout(function, {}, self.hook_timeout)
            except Exception as exc:
                # Safer to deliver too much than to lose events the plugin wanted.
                log.error("plugin %s: subscriptions failed: %s", name, describe_error(exc))
                continue
            answers[name] = frozenset(str(kind) for kind in kinds or ())
        return answers

    def wants(self, plugin: str, kind: EventKind) -> bool:
        subscribed = self.subscriptions.get(plugin)
        return plugin in self.enabled and (subscribed is None or kind.value in subscribed)

    def call_lifecycle(
        self, hook_name: str, *, only: Collection[str] | None = None, **kwargs: Any
    ) -> dict[str, str]:
        """Call a non-delivery hook on every enabled plugin (of ``only``), each on its own.

        Returns the error of each plugin whose call failed; the caller logs it.
        """
        failed: dict[str, str] = {}
        for name, function in self.plugins.implementations(hook_name):
            if name not in self.enabled or (only is not None and name not in only):
                continue
            try:
                call_with_timeout(function, kwargs, self.hook_timeout)
            except Exception as exc:
                failed[name] = describe_error(exc)
                if not isinstance(exc, (CertwardenError, CallTimeout)):
                    log.debug("plugin %s traceback", name, exc_info=exc)
        return failed

    def health(self) -> list[HealthProblem]:
        problems: list[HealthProblem] = []
        for name, function in self.plugins.implementations("certwarden_health"):
            if name not in self.enabled:
                continue
            try:
                problems.extend(call_with_timeout(function, {}, self.hook_timeout) or [])
            except Exception as exc:
                problems.append(HealthProblem(name, f"health check failed: {describe_error(exc)}"))
        return problems


class Dispatcher(PluginHost):
    """Owns the plugin workers; the engine hands it events, it hands them to plugins."""

    def __init__(
        self,
        plugins: PluginSet,
        state: StateStore,
        *,
        hook_timeout: float,
        retry: RetryPolicy,
        on_retry_scheduled: Callable[[float], None] = lambda at: None,
    ) -> None:
        super().__init__(plugins, hook_timeout=hook_timeout)
        self.state = state
        self.retry = retry
        self.on_retry_scheduled = on_retry_scheduled
        self._queues: dict[str, queue.Queue[int]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._queued: set[int] = set()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def configure(self, contexts: dict[str, PluginContext]) -> None:
        super().configure(contexts)
        for name in self.enabled:
            self._ensure_worker(name)

    # ---- deliveries ------------------------------------------------------------------------

    def plan(self, events: Sequence[Event]) -> list[NewDelivery]:
        """The deliveries ``events`` call for: one per enabled plugin implementing the hook
        and subscribed to the event."""
        deliveries: list[NewDelivery] = []
        for event in events:
            for name, _ in self.plugins.implementations(event.kind.hook_name):
                if not self.wants(name, event.kind):
                    continue
                deliveries.append(
                    NewDelivery(
                        plugin=name,
                        event_kind=event.kind.value,
                        event_id=event.id,
                        supersede_key=event.supersede_key,
                        subject=event.subject_name,
                        serial=event.serial,
                        payload=event.to_json(),
                    )
                )
        return deliveries

    def enqueue(self, delivery_ids: Sequence[int], plugins: Sequence[str] | None = None) -> None:
        """Hand recorded deliveries to their plugins' workers (``plugins`` when known)."""
        for position, delivery_id in enumerate(delivery_ids):
            if plugins is not None:
                plugin = plugins[position]
            else:
                delivery = self.state.delivery(delivery_id)
                if delivery is None:
                    continue
                plugin = delivery.plugin
            if plugin not in self.enabled:
                continue
            with self._lock:
                if delivery_id in self._queued:
                    continue
                self._queued.add(delivery_id)
            self._ensure_worker(plugin).put(delivery_id)

    def enqueue_open(self, *, due_only: bool) -> None:
        """Queue pending deliveries and failed ones (all, or only those due for a retry)."""
        due_before = time.time() if due_only else None
        deliveries = self.state.open_deliveries(due_before=due_before)
        self.enqueue([d.id for d in deliveries], [d.plugin for d in deliveries])
        self._announce_next_retry()

    def _ensure_worker(self, plugin: str) -> queue.Queue[int]:
        with self._lock:
            if plugin not in self._queues:
                self._queues[plugin] = queue.Queue()
                worker = threading.Thread(
                    target=self._work, args=(plugin,), name=f"plugin-{plugin}", daemon=True
                )
                self._workers[plugin] = worker
                worker.start()
            return self._queues[plugin]

    def _work(self, plugin: str) -> None:
        jobs = self._queues[plugin]
        while True:
            delivery_id = jobs.get()
            if delivery_id == _STOP:
                return
            with self._lock:
                self._busy.add(plugin)
            try:
                self._deliver(plugin, delivery_id)
            except Exception:
                log.exception("plugin %s: delivery %d crashed the dispatcher", plugin, delivery_id)
            finally:
                with self._lock:
                    self._queued.discard(delivery_id)
                    self._busy.discard(plugin)
                    self._idle.notify_all()

    def _deliver(self, plugin: str, delivery_id: int) -> None:
        delivery = self.state.delivery(delivery_id)
        if delivery is None or delivery.status not in ("pending", "failed"):
            return  # superseded by a newer event, or already done
        event = Event.from_json(delivery.payload)
        hook_name = EventKind(delivery.event_kind).hook_name
        functions = [f for name, f in self.plugins.implementations(hook_name) if name == plugin]
        error: str | None = None
        for function in functions:
            try:
                call_with_timeout(function, {"event": event}, self.hook_timeout)
            except Exception as exc:
                error = describe_error(exc)
                if not isinstance(exc, (CertwardenError, CallTimeout)):
                    log.debug("plugin %s traceback", plugin, exc_info=exc)
        attempt = delivery.attempts + 1
        retry_at = time.time() + self.retry.delay(attempt) if error else 0.0
        if not self.state.finish_delivery(
            delivery_id, ok=error is None, error=error, retry_at=retry_at
        ):
            return
        if error is None:
            log.info(
                "plugin %s: delivered %s %s%s (attempt %d)",
                plugin,
                delivery.event_kind,
                delivery.subject,
                f" serial {delivery.serial}" if delivery.serial else "",
                attempt,
            )
        else:
            log.error(
                "plugin %s: %s %s%s failed (attempt %d, retry in %s): %s",
                plugin,
                delivery.event_kind,
                delivery.subject,
                f" serial {delivery.serial}" if delivery.serial else "",
                attempt,
                timedelta(seconds=round(retry_at - time.time())),
                error,
            )
            self._announce_next_retry()

    def _announce_next_retry(self) -> None:
        # Only retries still to come: those already due were just queued, or belong to a
        # disabled plugin; scheduling them again would wake the scheduler at once, forever.
        at = self.state.next_retry_at(after=time.time())
        if at is not None:
            self.on_retry_scheduled(at)

    # ---- shutdown ----------------------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queue is empty and no call is running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queued or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stop(self, timeout: float) -> bool:
        idle = self.wait_idle(timeout)
        for jobs in self._queues.values():
            jobs.put(_STOP)
        return idle
