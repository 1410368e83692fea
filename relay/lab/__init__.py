"""A network-namespace lab (client -- router -- far -- server) with real proxies.

Used by the end-to-end tests and by ``relay demo``; needs root. See
:mod:`relay.lab.netns` for the topology and :mod:`relay.lab.services` for the
daemons (squid, danted, privoxy, tinyproxy, sshd, ssh tunnels).
"""

from relay.lab.netns import ADDR, HOSTS, Addresses, Lab, LabCommandError, LabError, remove_stale_labs
from relay.lab.services import (
    Dante,
    Service,
    Squid,
    SquidLogEntry,
    Sshd,
    SshTunnel,
    ensure_lab_user,
    start_dante,
    start_privoxy,
    start_squid,
    start_ssh_tunnel,
    start_sshd,
    start_tinyproxy,
)

__all__ = [
    "ADDR",
    "HOSTS",
    "Addresses",
    "Lab",
    "LabCommandError",
    "LabError",
    "remove_stale_labs",
    "Dante",
    "Service",
    "Squid",
    "SquidLogEntry",
    "Sshd",
    "SshTunnel",
    "ensure_lab_user",
    "start_dante",
    "start_privoxy",
    "start_squid",
    "start_ssh_tunnel",
    "start_sshd",
    "start_tinyproxy",
]
