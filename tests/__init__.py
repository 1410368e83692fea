"""The test suite: a package, so that tests/dns/ cannot shadow dnspython's dns for the top-level test modules."""
