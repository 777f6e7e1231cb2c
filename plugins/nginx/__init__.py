"""Keep nginx's mutual-TLS trust, CRL and server certificates current: ``[plugins.nginx]``.

For each ``[[plugins.nginx.targets]]`` table the plugin installs the CA bundle nginx reads with
``ssl_client_certificate``, the CRL file of ``ssl_crl`` (one CRL per CA in the chain,
concatenated, because nginx sets CRL_CHECK_ALL) and, optionally, server certificates with their
chain and key. Every deployment follows the installer pattern of certbot:

1. prepare: compute the whole desired content from the PKI (plus ``extra_ca_files`` and
   ``extra_crl_files`` for a root CA managed elsewhere) and check it the way nginx will use it:
   a chain to a self-signed root, exactly one valid CRL per CA, server keys matching;
2. compare with what is installed; identical content means nothing to do and no reload;
3. stage the new files next to their targets, then replace them by rename (nginx 1.27.4+
   caches SSL objects by inode and mtime), keeping the previous files as backups;
4. run the test command (``nginx -t``); on failure put the backups back and report nginx's
   own ``[emerg]`` line, without a reload;
5. run the reload command, then verify: no ``[emerg]``/``[alert]`` in the error log since the
   reload, and, with a ``probe``, a TLS request with a client certificate of the PKI gets the
   expected status from a server presenting the expected certificate serial.

Whatever the event (``ca_changed``, ``crl_published``, ``revoked``, the issue or renewal of a
server certificate it installs), the plugin syncs the whole desired state, under a lock shared
with ``certwarden nginx deploy``: events that arrive together cause one reload, and the
deliveries after the first find nothing left to do.

The CRL guard reads the deployed CRL files. Their nextUpdate goes out as the metric
``certwarden_deployed_crl_next_update_timestamp_seconds{target}``, which ``certwarden status``
judges by ``[status] crl_margin`` (exit 2 when one is within it: its refresh or its deployment
has failed); while the daemon runs the plugin logs an error each time it finds one there.
"""

from __future__ import annotations

from certwarden.plugins.nginx.plugin import Plugin
from certwarden.plugins.nginx.server import nginx_message
from certwarden.plugins.nginx.settings import (
    NginxError,
    NginxSettings,
    Probe,
    ServerCertificate,
    Target,
)

__all__ = [
    "NginxError",
    "NginxSettings",
    "Plugin",
    "Probe",
    "ServerCertificate",
    "Target",
    "nginx_message",
]
