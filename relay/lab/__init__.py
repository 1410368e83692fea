"""A network-namespace lab (client -- router -- far -- server) with real proxies.

Used by the end-to-end tests and by ``relay demo``; needs root. See
:mod:`relay.lab.netns` for the topology and :mod:`relay.lab.services` for the
daemons (squid, stunnel, danted, privoxy, tinyproxy, sshd, ssh tunnels, unbound, dnsmasq).
"""

from relay.lab.netns import ADDR, HOSTS, Addresses, Lab, LabCommandError, LabError, remove_stale_labs
from relay.lab.services import (
    Dante,
    Dnsmasq,
    LabCertificates,
    Service,
    Squid,
    SquidLogEntry,
    Sshd,
    SshTunnel,
    Unbound,
    ensure_lab_user,
    lab_certificates,
    ssh_argv,
    sshd_across_delay_line,
    start_dante,
    start_delay_line,
    start_dnsmasq,
    start_privoxy,
    start_squid,
    start_ssh_tunnel,
    start_sshd,
    start_stunnel,
    start_tinyproxy,
    start_unbound,
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
    "Dnsmasq",
    "LabCertificates",
    "Service",
    "Squid",
    "SquidLogEntry",
    "Sshd",
    "SshTunnel",
    "Unbound",
    "ensure_lab_user",
    "lab_certificates",
    "ssh_argv",
    "sshd_across_delay_line",
    "start_dante",
    "start_delay_line",
    "start_dnsmasq",
    "start_privoxy",
    "start_squid",
    "start_ssh_tunnel",
    "start_stunnel",
    "start_sshd",
    "start_tinyproxy",
    "start_unbound",
]
