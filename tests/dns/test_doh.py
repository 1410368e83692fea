"""relay.dns.doh against h2's own server side, sans-IO."""

import h2.config
import h2.connection

from relay.dns import doh


def client_and_server_with_two_queries():
    client = doh.DohClient("dns.example", "/dns-query")
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    first, second = client.start_query(b"q" * 20), client.start_query(b"r" * 20)
    server.receive_data(client.data_to_send())
    return client, server, first, second


def test_an_error_status_and_a_goaway_in_one_read_fail_that_query_only():
    """Resetting the refused stream after h2 took the GOAWAY is no error: the answer read with them stands."""
    client, server, first, second = client_and_server_with_two_queries()
    server.send_headers(second, [(b":status", b"200"), (b"content-type", b"application/dns-message")])
    server.send_data(second, b"A" * 30, end_stream=True)
    server.send_headers(first, [(b":status", b"503")])
    server.close_connection(last_stream_id=second)
    outcomes = client.receive_data(server.data_to_send())
    assert doh.Answer(second, b"A" * 30) in outcomes
    assert [(o.stream_id, o.reason) for o in outcomes if isinstance(o, doh.Failed)] == [(first, "http-503")]
    assert not client.accepting
