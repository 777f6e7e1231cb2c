"""The ``[plugins.nginx]`` settings (targets, server certificates, the probe) and NginxError."""

from __future__ import annotations

import grp
import pwd
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

from certwarden.config import (
    CertificateName,
    Command,
    ConfigPath,
    DocHint,
    Duration,
    NonEmptyString,
    PluginSettings,
)
from certwarden.errors import CertwardenError

PLUGIN_NAME = "nginx"
MAX_READ = 1 << 20  # CA bundles and CRLs are small; refuse to read a huge file into memory


def _file_mode(value: object) -> int:
    # TOML has octal integers (0o640) but people write modes as strings ("0640"); take both.
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        mode = int(value.strip(), 8)
    else:
        raise ValueError('must be a file mode such as "0644" (a string) or 0o644')
    if not 0 <= mode <= 0o777:
        raise ValueError("must be a file mode between 0000 and 0777 (no setuid, setgid or sticky)")
    return mode


FileMode = Annotated[int, PlainValidator(_file_mode), DocHint(type="file mode")]


def _key_mode(mode: int) -> int:
    if mode & 0o007:
        raise ValueError(
            f"{mode:04o} lets every user read the private key; use 0600 or 0640 with a group"
        )
    return mode


def _user(value: str) -> str:
    if not value.isdigit():
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise ValueError(f"no user {value!r} on this host") from None
    return value


def _group(value: str) -> str:
    if not value.isdigit():
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no group {value!r} on this host") from None
    return value


def _address(value: str) -> str:
    host, port = split_address(value)
    if not host:
        raise ValueError(f"{value!r} has no host; write it as host:port such as 127.0.0.1:443")
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535")
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:443"`` -> ("127.0.0.1", 443); ``"[::1]:443"`` -> ("::1", 443)."""
    host, colon, port = value.strip().rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"{value!r} must be host:port, such as 127.0.0.1:443 or [::1]:443")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerCertificate(_Table):
    """A certificate of the PKI that nginx serves:
    ``[[plugins.nginx.targets.server_certificates]]``."""

    name: CertificateName = Field(
        description="Certificate name in the PKI (`issued/NAME.crt`, `private/NAME.key`).",
    )
    cert: ConfigPath = Field(
        description="Where nginx reads it (`ssl_certificate`): the certificate followed by "
        "its intermediate CA certificates.",
    )
    key: ConfigPath = Field(
        description="Where nginx reads its private key (`ssl_certificate_key`), written with "
        "`key_mode`.",
    )


class Probe(_Table):
    """A request made after every reload to prove that nginx took the new files."""

    address: Annotated[str, AfterValidator(_address), DocHint(type="host:port")] = Field(
        description='Where nginx listens for mutual TLS, such as `"127.0.0.1:443"`.',
    )
    certificate: CertificateName = Field(
        description="Client certificate of the PKI the probe presents (its key must be on "
        "this host). When it is revoked or expired the files are still deployed, but the "
        "probe is skipped and the deployment reported as failed.",
    )
    server_name: NonEmptyString | None = Field(
        default=None,
        description="Name sent as SNI and Host header; default: the host of `address`.",
    )
    path: Annotated[str, Field(pattern=r"^/\S*$")] = Field(
        default="/",
        description="Path of the GET request.",
    )
    expected_status: Annotated[int, Field(ge=100, le=599)] = Field(
        default=200,
        description="HTTP status the probe must get.",
    )
    server_certificate: CertificateName | None = Field(
        default=None,
        description="Name of a server certificate of this target whose current serial nginx "
        "must present; default: the target's only server certificate, if it has exactly one.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=5),
        description="How long one probe request may take.",
    )


class Target(_Table):
    """One nginx and the files it reads: ``[[plugins.nginx.targets]]``."""

    name: NonEmptyString | None = Field(
        default=None,
        description="Name of the target in messages and for `certwarden nginx snippet "
        "--target`; default: `targets[N]`.",
    )
    ca_bundle: ConfigPath = Field(
        description="File nginx reads with `ssl_client_certificate`: the PKI's `ca.crt` and "
        "`extra_ca_files`, one PEM certificate after the other.",
    )
    crl: ConfigPath = Field(
        description="File nginx reads with `ssl_crl`: the PKI's `crl.pem` and "
        "`extra_crl_files`, one CRL per CA of the bundle.",
    )
    # Managed elsewhere, so read at each deployment rather than checked at load: a missing
    # root CRL must fail the deployment (nginx keeps its files), not every command,
    # `certwarden revoke` and `status` included.
    extra_ca_files: tuple[ConfigPath, ...] = Field(
        default=(),
        description="CA certificates managed elsewhere that complete the chain, such as the "
        "root CA above the PKI's intermediate `ca.crt` (PEM). Read at each deployment; a "
        "missing or broken one fails it and nginx keeps its files.",
    )
    extra_crl_files: tuple[ConfigPath, ...] = Field(
        default=(),
        description="CRLs of the `extra_ca_files` CAs (PEM). nginx checks a CRL for every CA "
        "in the chain and rejects every client when one is missing or expired. Read at each "
        "deployment, like `extra_ca_files`.",
    )
    server_certificates: tuple[ServerCertificate, ...] = Field(
        default=(),
        description="Server certificates of the PKI to install, as "
        "`[[plugins.nginx.targets.server_certificates]]` tables.",
    )
    test_command: Command = Field(
        default=("nginx", "-t"),
        description="Checks nginx's configuration with the new files; a non-zero exit puts "
        "the previous files back. Add `-c`/`-p` for a non-default nginx.",
    )
    reload_command: Command = Field(
        default=("nginx", "-s", "reload"),
        description='Makes nginx read the new files, such as `["systemctl", "reload", "nginx"]`.',
    )
    error_log: ConfigPath | None = Field(
        default=Path("/var/log/nginx/error.log"),
        description="nginx's error log, read after a reload for `[emerg]` and `[alert]` "
        "lines. At `notice` level it also shows when the old workers stop accepting, so "
        "verification ends at once instead of after a second.",
    )
    owner: Annotated[str, AfterValidator(_user)] | None = Field(
        default=None,
        description="User owning the installed files (name or number); default: certwarden's.",
    )
    group: Annotated[str, AfterValidator(_group)] | None = Field(
        default=None,
        description="Group of the installed files (name or number); default: certwarden's.",
    )
    mode: Annotated[FileMode, DocHint(default='`"0644"`')] = Field(
        default=0o644,
        description="Mode of the installed CA bundle, CRL and certificate files.",
    )
    key_mode: Annotated[FileMode, AfterValidator(_key_mode), DocHint(default='`"0600"`')] = Field(
        default=0o600,
        description="Mode of the installed private keys; never readable by other users.",
    )
    probe: Probe | None = Field(
        default=None,
        description="Optional `[plugins.nginx.targets.probe]` table: a request made after "
        "each reload.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        paths = [self.ca_bundle, self.crl]
        for server in self.server_certificates:
            paths += [server.cert, server.key]
        duplicates = sorted({str(p) for p in paths if paths.count(p) > 1})
        if duplicates:
            raise ValueError(f"two installed files share the path {', '.join(duplicates)}")
        names = [server.name for server in self.server_certificates]
        wanted = self.probe.server_certificate if self.probe is not None else None
        if wanted is not None and wanted not in names:
            raise ValueError(
                f"probe.server_certificate {wanted!r} is not one of this target's "
                "server_certificates"
            )
        return self

    def label(self, index: int) -> str:
        return self.name or f"targets[{index}]"

    def expected_server(self) -> str | None:
        """The server certificate whose serial the probe checks, if any."""
        if self.probe is None:
            return None
        if self.probe.server_certificate is not None:
            return self.probe.server_certificate
        if len(self.server_certificates) == 1:
            return self.server_certificates[0].name
        return None


class NginxSettings(PluginSettings):
    """``[plugins.nginx]``: keep nginx's client-certificate trust, CRL and server
    certificates current, test them with nginx and reload it."""

    targets: tuple[Target, ...] = Field(
        default=(),
        description="The nginx instances to keep current, as `[[plugins.nginx.targets]]` "
        "tables; one is the common case.",
    )
    command_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="How long the test and reload commands may run.",
    )
    verify_timeout: Duration = Field(
        default=timedelta(seconds=5),
        description="How long to wait after a reload for the error log and the probe to "
        "confirm it.",
    )

    @model_validator(mode="after")
    def _targets_when_enabled(self) -> Self:
        if self.enabled and not self.targets:
            raise ValueError("enabled, but no [[plugins.nginx.targets]] table says what to install")
        names = [t.name for t in self.targets if t.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("two targets have the same name")
        return self


# ---- errors --------------------------------------------------------------------------------


class NginxError(CertwardenError):
    """A deployment to nginx failed; the message names the target and the file or command."""

    exit_code = 69  # EX_UNAVAILABLE
