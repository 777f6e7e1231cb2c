"""The one error tree of certwarden.

Every expected failure is a :class:`CertwardenError`: its message is one line that names the
file, field or certificate at fault and says what to do, and its ``exit_code`` is distinct per
kind (sysexits.h values, so shell scripts and systemd can tell them apart). Anything else is a
bug and keeps its traceback in the log.
"""

from __future__ import annotations


class CertwardenError(Exception):
    """An expected failure with a one-line message meant for the operator."""

    exit_code = 1

    def __str__(self) -> str:
        # One line, always: a multi-line message would break journald and table output.
        return " ".join(super().__str__().split())


class UsageError(CertwardenError):
    """The command line asked for something that cannot be done as written."""

    exit_code = 64  # EX_USAGE


class ConfigError(CertwardenError):
    """The configuration is invalid; ``problems`` holds every ``path: reason`` found."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class PKIError(CertwardenError):
    """Something in the PKI directory is missing, malformed or unsafe."""

    exit_code = 65  # EX_DATAERR


class InvalidName(PKIError):
    """A certificate name that would be unsafe as a file name or a subject."""

    exit_code = 65


class MalformedFile(PKIError):
    """A file in the PKI that does not hold what its place says it holds."""

    exit_code = 65


class NotFound(PKIError):
    """A certificate, key or request that the command needs does not exist."""

    exit_code = 66  # EX_NOINPUT


class AlreadyExists(PKIError):
    """The command would overwrite something that must stay."""

    exit_code = 73  # EX_CANTCREAT


class InsecurePermissions(PKIError):
    """A private key that others can read; certwarden refuses to use it."""

    exit_code = 77  # EX_NOPERM


class LockHeld(PKIError):
    """Another process (easy-rsa or certwarden) is writing the PKI."""

    exit_code = 75  # EX_TEMPFAIL


class StorageError(CertwardenError):
    """Writing failed (full disk, read-only file system). The message says whether nothing
    was changed or the write is journaled and completes at the next certwarden write."""

    exit_code = 74  # EX_IOERR


class PluginError(CertwardenError):
    """A plugin could not be loaded or declares a hook that does not exist."""

    exit_code = 78


class DaemonRunning(CertwardenError):
    """Another certwarden daemon already uses this state folder."""

    exit_code = 75  # EX_TEMPFAIL
